"""One ONNX Runtime call for the steps of several sessions: each gets what it gets alone.

`CloudModel.run_group` stacks the sessions' rows and the used slots of their
caches, and masks the shorter ones past their own lengths; these tests run the
same steps for twin sessions, one set alone and one set grouped, and compare
every segment's outputs and the KV caches they leave, on full attention and on
a sliding window shorter than some of the pasts, with one cache growing by a
chunk on the way; and as sessions come into groups and leave them, with the
caches the groups share (SharedCache).
"""

from __future__ import annotations

import numpy as np
import pytest

from plcli.runtime.cloud import KV_CHUNK, CloudModel, CloudSession, StepOutput, cache_slots

# name -> (family, config overrides); the names and options match test_serving's, so the builds are shared.
MODELS = {
    "llama": ("llama", {}),
    "mistral-window": ("mistral", {"sliding_window": 8}),
}
PASTS = [0, 3, 11, KV_CHUNK - 3]  # around and beyond the sliding window of 8; the last one's cache grows
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def cloud_dir(checkpoint_factory, bundle_factory):
    def get(name: str):
        family, overrides = MODELS[name]
        return bundle_factory(checkpoint_factory(name, family, **overrides), rank=8) / "cloud"

    return get


def madx_for(out: StepOutput) -> np.ndarray:
    """A stand-in edge: M = 0.5 on every cut, so each answer depends on the `A x` it answers."""
    return 0.5 * out.ax


def step_alone(session: CloudSession, embeds: np.ndarray) -> list[np.ndarray]:
    """One step through every segment; what each segment handed back (every `A x`, then the hidden state)."""
    out = session.start(embeds)
    seen = [out.ax]
    while not out.done:
        out = session.resume(madx_for(out))
        seen.append(out.hidden if out.done else out.ax)
    return seen


def step_grouped(cloud: CloudModel, sessions: list[CloudSession], embeds: list[np.ndarray]) -> list[list[np.ndarray]]:
    """The same step for every session, each segment as one call for all of them."""
    calls = [s.start_call(e) for s, e in zip(sessions, embeds)]
    seen: list[list[np.ndarray]] = [[] for _ in sessions]
    while True:
        outs = [s.complete(o) for s, o in zip(sessions, cloud.run_group(calls))]
        for mine, out in zip(seen, outs):
            mine.append(out.hidden if out.done else out.ax)
        if outs[0].done:
            assert all(o.done for o in outs)
            return seen
        # The projections after the cut as one call too, as a server runs them while edges answer.
        for s, o in zip(sessions, cloud.run_group([s.projection_call() for s in sessions])):
            s.complete_projection(o)
        calls = [s.resume_call(madx_for(o)) for s, o in zip(sessions, outs)]


@pytest.mark.parametrize("prepack", [False, True], ids=["weights-fed", "weights-prepacked"])
@pytest.mark.parametrize("name", list(MODELS))
def test_a_group_of_sessions_with_different_pasts_gets_what_each_gets_alone(cloud_dir, name, prepack):
    cloud = CloudModel(cloud_dir(name), threads=1, prepack=prepack)
    hidden = cloud.arch.hidden_size
    rng = np.random.default_rng(0)
    alone = [cloud.new_session() for _ in PASTS]
    grouped = [cloud.new_session() for _ in PASTS]
    for a, g, past in zip(alone, grouped, PASTS):
        if past:
            prompt = rng.standard_normal((1, past, hidden)).astype(np.float32)
            step_alone(a, prompt)
            step_alone(g, prompt)
    # Three decode steps, then a three-token step (a chat turn's prompt after a cached conversation).
    for seq in (1, 1, 1, 3):
        embeds = [rng.standard_normal((1, seq, hidden)).astype(np.float32) for _ in PASTS]
        want = [step_alone(a, e) for a, e in zip(alone, embeds)]
        got = step_grouped(cloud, grouped, embeds)
        for past, w, g in zip(PASTS, want, got):
            assert len(w) == len(g) == len(cloud.plan.segments)
            for segment, (w_out, g_out) in enumerate(zip(w, g)):
                np.testing.assert_allclose(g_out, w_out, rtol=RTOL, atol=ATOL, err_msg=f"past {past}, segment {segment}")
    for a, g, past in zip(alone, grouped, PASTS):
        assert g.position == a.position == past + 6 and not g.in_step
        for layer in range(cloud.arch.num_layers):
            (wk, wv), (gk, gv) = a.cache(layer), g.cache(layer)
            assert gk.shape == wk.shape == (1, cloud.arch.num_kv_heads, past + 6, cloud.arch.head_dim), f"layer {layer}"
            np.testing.assert_allclose(gk, wk, rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(gv, wv, rtol=RTOL, atol=ATOL)


def test_a_group_runs_one_segment_with_one_number_of_new_tokens(cloud_dir):
    cloud = CloudModel(cloud_dir("llama"), threads=1)
    hidden = cloud.arch.hidden_size
    one, three = cloud.new_session(), cloud.new_session()
    calls = [one.start_call(np.zeros((1, 1, hidden), np.float32)), three.start_call(np.zeros((1, 3, hidden), np.float32))]
    with pytest.raises(ValueError, match="one number of new tokens"):
        cloud.run_group(calls)


def test_fresh_sessions_grouped_get_what_each_gets_alone(cloud_dir):
    """Prompts of sessions with nothing cached yet: the group's stacked cache has no slot at all."""
    cloud = CloudModel(cloud_dir("llama"), threads=1, prepack=True)
    rng = np.random.default_rng(1)
    embeds = [rng.standard_normal((1, 5, cloud.arch.hidden_size)).astype(np.float32) for _ in range(3)]
    want = [step_alone(cloud.new_session(), e) for e in embeds]
    got = step_grouped(cloud, [cloud.new_session() for _ in embeds], embeds)
    for w, g in zip(want, got):
        for w_out, g_out in zip(w, g):
            np.testing.assert_allclose(g_out, w_out, rtol=RTOL, atol=ATOL)


def test_stacked_caches_hold_zeros_in_the_free_slots_whatever_the_memory_held(monkeypatch):
    """Masking adds a bias to a free slot's score rather than replacing it: a NaN left in memory would poison the row."""
    from plcli.runtime import cloud as cloud_module

    rng = np.random.default_rng(2)
    buffers = [rng.standard_normal((1, 2, slots, 4)).astype(np.float32) for slots in (32, 64, 32)]
    with monkeypatch.context() as patch:
        patch.setattr(cloud_module.np, "empty", lambda shape, dtype=float: np.full(shape, np.nan, dtype))
        stacked = cloud_module._stack_cache(buffers, [3, 40, 0])
    assert stacked.shape == (3, 2, 40, 4)
    for row, (buffer, used) in enumerate(zip(buffers, [3, 40, 0])):
        np.testing.assert_array_equal(stacked[row, :, :used], buffer[0, :, :used])
        assert not stacked[row, :, used:].any()


def _decode_twins(cloud, pasts, rng):
    """Sessions with `pasts` cached tokens, each with a twin that will run alone."""
    hidden = cloud.arch.hidden_size
    alone, grouped = [cloud.new_session() for _ in pasts], [cloud.new_session() for _ in pasts]
    for a, g, past in zip(alone, grouped, pasts):
        prompt = rng.standard_normal((1, past, hidden)).astype(np.float32)
        step_alone(a, prompt)
        step_alone(g, prompt)
    return alone, grouped


def _check_step(cloud, alone, grouped, rng):
    """One decode step for each session of `alone`, and as one group for their twins in `grouped`: the same outputs."""
    embeds = [rng.standard_normal((1, 1, cloud.arch.hidden_size)).astype(np.float32) for _ in alone]
    want = [step_alone(a, e) for a, e in zip(alone, embeds)]
    got = step_grouped(cloud, grouped, embeds)
    for w, g in zip(want, got):
        for w_out, g_out in zip(w, g):
            np.testing.assert_allclose(g_out, w_out, rtol=RTOL, atol=ATOL)


def test_a_group_that_runs_again_reads_its_caches_in_place(cloud_dir, monkeypatch):
    """The first call of a group stacks its members' caches into buffers they then share; the group's next calls, in
    any order of members, copy nothing, and give what each session gets alone."""
    from plcli.runtime import cloud as cloud_module

    cloud = CloudModel(cloud_dir("llama"), threads=1, prepack=True)
    rng = np.random.default_rng(3)
    alone, grouped = _decode_twins(cloud, [2, 5, 9], rng)
    _check_step(cloud, alone, grouped, rng)
    for layer in range(cloud.arch.num_layers):
        shared = grouped[0].shared[layer]
        assert shared is not None and all(g.shared[layer] is shared for g in grouped)
        assert [shared.rows[g] for g in grouped] == [(0, 1), (1, 1), (2, 1)]
        assert all(np.shares_memory(g.kv[layer][0], shared.keys) for g in grouped)
    stacked = []
    monkeypatch.setattr(cloud_module, "_stack_cache", lambda *a, **k: stacked.append(a) or pytest.fail("copied"))
    _check_step(cloud, alone, grouped, rng)
    _check_step(cloud, alone[::-1], grouped[::-1], rng)
    assert not stacked


def test_members_that_leave_a_shared_cache_leave_the_others_exact_and_never_more_than_twice_the_memory(cloud_dir):
    """Some members of a group run as another group, one grows past the buffers and one is released: once half the rows
    are left behind, the rest move to buffers of their own, and every session still gets what it gets alone."""
    cloud = CloudModel(cloud_dir("llama"), threads=1, prepack=True)
    rng = np.random.default_rng(4)
    alone, grouped = _decode_twins(cloud, [3, 4, 6, 7], rng)
    _check_step(cloud, alone, grouped, rng)
    first = grouped[0].shared[0]
    # Rows 0 and 2: one buffer, rows apart: stacked for this call only, the buffer kept whole for its group.
    _check_step(cloud, [alone[0], alone[2]], [grouped[0], grouped[2]], rng)
    assert all(g.shared[0] is first for g in grouped)
    # Rows 1 and 3 with a session from elsewhere: they move to new buffers; half the first one's rows are still used.
    extra_alone, extra = _decode_twins(cloud, [5], rng)
    _check_step(cloud, [alone[1], alone[3], *extra_alone], [grouped[1], grouped[3], *extra], rng)
    assert grouped[0].shared[0] is None and grouped[2].shared[0] is None  # half left: the other half moved out
    assert grouped[1].shared[0] is grouped[3].shared[0] is extra[0].shared[0] is not None
    assert not np.shares_memory(grouped[0].kv[0][0], first.keys)
    # A member whose cache must grow past the buffers leaves them too; released, one leaves them for good.
    big = grouped[1].shared[0].keys.shape[2]
    prompt = rng.standard_normal((1, big - grouped[1].position + 1, cloud.arch.hidden_size)).astype(np.float32)
    step_alone(alone[1], prompt)
    step_alone(grouped[1], prompt)
    assert grouped[1].shared[0] is None
    extra[0].release()
    assert grouped[3].shared[0] is None and all(s is None for s in extra[0].shared)
    _check_step(cloud, alone, grouped, rng)
    for a, g in zip(alone, grouped):
        for layer in range(cloud.arch.num_layers):
            np.testing.assert_allclose(g.cache(layer)[0], a.cache(layer)[0], rtol=RTOL, atol=ATOL)


def test_a_short_session_grouped_with_a_long_one_is_as_wide_as_it_needs_once_it_leaves(cloud_dir):
    """A group's shared rows are as wide as its longest member needs; once the long one is gone, the short one's cache
    is its own tokens with a chunk to spare again, not the long one's width, and it still gets what it gets alone."""
    cloud = CloudModel(cloud_dir("llama"), threads=1, prepack=True)
    rng = np.random.default_rng(5)
    alone, grouped = _decode_twins(cloud, [3, 100], rng)
    _check_step(cloud, alone, grouped, rng)
    wide = grouped[0].kv[0][0].shape[2]
    assert wide >= 100 + 1
    grouped[1].release()
    for layer in range(cloud.arch.num_layers):
        assert grouped[0].shared[layer] is None
        assert grouped[0].kv[layer][0].shape[2] == cache_slots(grouped[0].position + KV_CHUNK) < wide
    # Grouped again with another short session: rows as wide as these two need, whatever their buffers held before.
    more_alone, more = _decode_twins(cloud, [5], rng)
    _check_step(cloud, [alone[0], *more_alone], [grouped[0], *more], rng)
    assert grouped[0].kv[0][0].shape[2] == cache_slots(grouped[0].position - 1 + KV_CHUNK)
    _check_step(cloud, [alone[0], *more_alone], [grouped[0], *more], rng)
