"""The one check everything else rests on: the split reproduces transformers."""

from plcli.exporters.verify import verify


def test_split_matches_transformers_with_random_m(llama_bundle, llama_checkpoint):
    results = verify(llama_bundle, llama_checkpoint, decode_steps=2)
    assert results and all(r.ok for r in results), [r for r in results if not r.ok]
