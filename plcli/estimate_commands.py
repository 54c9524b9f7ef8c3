"""`plcli estimate`: the paper's analytical decode throughput, every input a flag, plus round-trip latency."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import typer
from rich import box
from rich.table import Table

from plcli.runtime import estimate as est
from plcli.runtime.plan import DEFAULT_TARGETS, normalize_targets

from .app import UserError, app, console, print_json, print_table, reports_errors

RTT_SWEEP_MS = (0.0, 20.0, 50.0)
TERM_COLUMNS = {  # Terms field -> column heading (ms per token)
    "cloud": "cloud", "adapter": "M", "head": "head", "device_model": "model", "transfer": "link", "latency": "RTT",
}
METHOD_TERMS = {
    "device-only": ("device_model",),
    "cloud-only": ("cloud",),
    "privatelora": ("cloud", "adapter", "head", "transfer", "latency"),
}


@app.command()
@reports_errors
def estimate(
    paper: bool = typer.Option(False, "--paper", help="The paper's setting: LLaMA 2-7B, 2-13B, LLaMA-30B, its measured cloud rates, Table 3 alongside."),
    model: Optional[str] = typer.Option(None, "--model", help=f"Model preset: {', '.join(est.PRESETS)}."),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="Hidden size (overrides the preset)."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Decoder layers (overrides the preset)."),
    vocab: Optional[int] = typer.Option(None, "--vocab", help="Vocabulary size (overrides the preset)."),
    intermediate: Optional[int] = typer.Option(None, "--intermediate", help="MLP intermediate size, for the parameter count."),
    params: Optional[int] = typer.Option(None, "--params", help="Total parameters, instead of counting them from the dimensions."),
    rank: int = typer.Option(est.PAPER_RANK, "--rank", help="Adapter rank r."),
    targets: str = typer.Option(",".join(DEFAULT_TARGETS), "--targets", help="Adapted projections, comma-separated."),
    cloud_bandwidth_gbs: Optional[float] = typer.Option(None, "--cloud-bandwidth-gbs", help=f"Cloud memory bandwidth, GB/s (default {est.PAPER_CLOUD.bandwidth_gbs:g})."),
    cloud_tflops: Optional[float] = typer.Option(None, "--cloud-tflops", help=f"Cloud 16-bit TFLOP/s (default {est.PAPER_CLOUD.tflops:g})."),
    cloud_efficiency: Optional[float] = typer.Option(None, "--cloud-efficiency", help=f"Fraction of cloud bandwidth reached when derived (default {est.DEFAULT_CLOUD_EFFICIENCY:g})."),
    cloud_tps: Optional[float] = typer.Option(None, "--cloud-tps", help="A measured cloud decode rate, tok/s, instead of the bandwidth estimate."),
    device_bandwidth_gbs: float = typer.Option(est.PAPER_DEVICE.bandwidth_gbs, "--device-bandwidth-gbs", help="Device memory bandwidth, GB/s."),
    device_tflops: float = typer.Option(est.PAPER_DEVICE.tflops, "--device-tflops", help="Device TFLOP/s."),
    device_efficiency: float = typer.Option(est.PAPER_DEVICE.efficiency, "--device-efficiency", help="Fraction of device bandwidth reached (1: the paper's bandwidth-bound premise)."),
    device_only_bits: float = typer.Option(est.PAPER_DEVICE_ONLY_BITS, "--device-only-bits", help="Weight bits when the whole model runs on the device."),
    up_mbps: float = typer.Option(est.PAPER_LINK.up_mbps, "--up-mbps", help="Link rate edge -> cloud, Mbit/s."),
    down_mbps: float = typer.Option(est.PAPER_LINK.down_mbps, "--down-mbps", help="Link rate cloud -> edge, Mbit/s."),
    rtt_ms: float = typer.Option(est.PAPER_LINK.rtt_ms, "--rtt-ms", help="Round-trip time, ms, paid once per exchange."),
    bits: float = typer.Option(est.PAPER_ACTIVATION_BITS, "--bits", help="Bits per activation on the wire."),
    as_json: bool = typer.Option(False, "--json", help="Print the estimate as JSON."),
):
    """Decode tokens/s of device-only, cloud-only and PrivateLoRA from hardware, link and model figures."""
    cloud_flags = {"--cloud-bandwidth-gbs": cloud_bandwidth_gbs, "--cloud-tflops": cloud_tflops, "--cloud-efficiency": cloud_efficiency}
    given_cloud = [flag for flag, v in cloud_flags.items() if v is not None]
    if paper:
        dims_given = [f for f, v in {"--model": model, "--hidden": hidden, "--layers": layers, "--vocab": vocab,
                                     "--intermediate": intermediate, "--params": params, "--cloud-tps": cloud_tps}.items() if v is not None]
        if dims_given + given_cloud:
            raise UserError(f"--paper fixes the models and uses the paper's measured cloud rates; drop {', '.join(dims_given + given_cloud)} or --paper")
        models = list(est.PRESETS.values())
    else:
        models = [_model(model, hidden, layers, vocab, intermediate, params)]
        if cloud_tps is not None and given_cloud:
            raise UserError(f"--cloud-tps replaces the cloud estimate; drop {', '.join(given_cloud)} or --cloud-tps")

    cloud = _processor(
        est.PAPER_CLOUD, "cloud",
        _positive("--cloud-bandwidth-gbs", est.PAPER_CLOUD.bandwidth_gbs if cloud_bandwidth_gbs is None else cloud_bandwidth_gbs),
        _positive("--cloud-tflops", est.PAPER_CLOUD.tflops if cloud_tflops is None else cloud_tflops),
        _fraction("--cloud-efficiency", est.DEFAULT_CLOUD_EFFICIENCY if cloud_efficiency is None else cloud_efficiency),
    )
    device = _processor(
        est.PAPER_DEVICE, "device", _positive("--device-bandwidth-gbs", device_bandwidth_gbs),
        _positive("--device-tflops", device_tflops), _fraction("--device-efficiency", device_efficiency),
    )
    if not (math.isfinite(rtt_ms) and rtt_ms >= 0):
        raise UserError(f"--rtt-ms must be 0 or more, got {rtt_ms:g}")
    link = est.Link(_positive("--up-mbps", up_mbps), _positive("--down-mbps", down_mbps), rtt_ms)
    _positive("--bits", bits)
    _positive("--device-only-bits", device_only_bits)
    if cloud_tps is not None:
        _positive("--cloud-tps", cloud_tps)
    try:
        target_names = normalize_targets(targets)
    except ValueError as e:
        raise UserError(f"--targets: {e}") from None

    scenarios = []
    for dims in models:
        if not 1 <= rank <= dims.hidden:
            raise UserError(f"--rank must be 1 to hidden ({dims.hidden}) for {dims.name}, got {rank}")
        try:
            for target in target_names:
                dims.target_dims(target)
        except ValueError as e:
            raise UserError(f"--targets: {e}: give --intermediate") from None
        measured = est.PAPER_TABLE3[dims.name]["cloud-only"] if paper else cloud_tps
        scenarios.append(est.Scenario(dims, cloud, device, link, rank=rank, targets=target_names, activation_bits=bits,
                                      device_only_bits=device_only_bits, cloud_tps=measured))

    report = _report(scenarios, paper)
    # Finite figures can still overflow: 1e-320 Mbit/s takes forever to send a token.
    overflow = _first_non_finite(report)
    if overflow:
        raise UserError(f"the figures given take the estimate out of range ({overflow}): give those of real hardware")
    if as_json:
        print_json(report)
    else:
        _print_report(report, scenarios, paper)


MAX_LAYERS = 10_000  # far past any model's


def _model(preset: str | None, hidden, layers, vocab, intermediate, params) -> est.ModelDims:
    if preset is not None:
        if preset not in est.PRESETS:
            raise UserError(f"unknown --model {preset!r}; presets: {', '.join(est.PRESETS)}")
        base = est.PRESETS[preset]
    else:
        missing = [f for f, v in (("--hidden", hidden), ("--layers", layers), ("--vocab", vocab)) if v is None]
        if intermediate is None and params is None:
            missing.append("--intermediate or --params")
        if missing:
            raise UserError(f"give --paper, --model PRESET ({', '.join(est.PRESETS)}), or the model: missing {', '.join(missing)}")
        base = est.ModelDims("custom", hidden, layers, vocab, intermediate)
    overrides = {k: v for k, v in dict(hidden=hidden, layers=layers, vocab=vocab, intermediate=intermediate, params=params).items() if v is not None}
    dims = est.ModelDims(**{**vars(base), **overrides})
    for flag, v in (("--hidden", dims.hidden), ("--layers", dims.layers), ("--vocab", dims.vocab),
                    ("--intermediate", dims.intermediate), ("--params", dims.params)):
        if v is not None and v <= 0:
            raise UserError(f"{flag} must be positive, got {v}")
    if dims.layers > MAX_LAYERS:  # the split plan is built layer by layer: 10**20 of them never finished
        raise UserError(f"--layers {dims.layers} is out of range: 1 to {MAX_LAYERS:,}")
    if dims.decoder_params <= 0:
        raise UserError(f"--params {dims.total_params:,} does not cover the embedding and head (2 x vocab x hidden = {2 * dims.head_params:,})")
    return dims


def _processor(preset: est.Processor, generic_name: str, bandwidth_gbs: float, tflops: float, efficiency: float) -> est.Processor:
    """The preset's name only while its hardware figures are the preset's."""
    same = (bandwidth_gbs, tflops) == (preset.bandwidth_gbs, preset.tflops)
    return est.Processor(preset.name if same else generic_name, bandwidth_gbs, tflops, efficiency)


def _positive(flag: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{flag} must be positive and finite, got {value:g}")
    return value


def _fraction(flag: str, value: float) -> float:
    if not 0 < value <= 1:
        raise UserError(f"{flag} must be in (0, 1], got {value:g}")
    return value


def _first_non_finite(obj, where: str = "") -> str | None:
    """`key = value` of the first NaN or infinity in a report, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{where} = {obj:g}"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        found = _first_non_finite(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def _report(scenarios: list[est.Scenario], paper: bool) -> dict:
    rows, sweep, models = [], [], []
    rtts = sorted(set(RTT_SWEEP_MS) | {scenarios[0].link.rtt_ms})
    for s in scenarios:
        t = est.traffic(s)
        models.append({"model": s.model.name, "params": s.model.total_params, "adapter_params": s.adapter_params,
                       "bits_up": t.bits_up, "bits_down": t.bits_down, "round_trips": t.round_trips})
        table3 = est.PAPER_TABLE3.get(s.model.name, {}) if paper else {}
        for method, terms in est.estimate(s).items():
            rows.append({
                "model": s.model.name, "method": method, "tps_estimated": round(terms.tps, 3), "tps_paper": table3.get(method),
                "ms_per_token": {k: round(getattr(terms, k) * 1e3, 4) for k in METHOD_TERMS[method]},
                "total_ms": round(terms.total * 1e3, 4),
            })
        for method in est.METHODS:
            sweep.append({"model": s.model.name, "method": method,
                          "tps_by_rtt_ms": {f"{r:g}": round(est.estimate(est.with_rtt(s, r))[method].tps, 3) for r in rtts}})
    s = scenarios[0]
    extra = {"blog_traffic_rows": _blog_traffic_rows(scenarios)} if paper else {}
    return {
        "setting": "paper" if paper else "custom",
        "cloud_term": "measured" if s.cloud_tps is not None else "derived",
        "assumptions": {
            "cloud": vars(s.cloud), "device": vars(s.device), "link": vars(s.link), "rank": s.rank,
            "targets": list(s.targets), "activation_bits": s.activation_bits, "device_only_bits": s.device_only_bits,
            "weight_bytes": est.WEIGHT_BYTES,
        },
        "models": models, "rows": rows, "rtt_sweep": sweep, **extra,
    }


def _blog_traffic_rows(scenarios: list[est.Scenario]) -> list[dict]:
    """PrivateLoRA as the blog counts traffic (r x 2 x layers x 16 bit): one rank-r vector per layer each way.

    That is the traffic of a single adapted projection, so the scenario is rerun with one target
    (which also shrinks M to a third: under 0.1 ms).
    """
    rows = []
    for s in scenarios:
        tps = est.privatelora(replace(s, targets=est.DEFAULT_TARGETS[:1])).tps
        rows.append({"model": s.model.name, "tps_estimated": round(tps, 3), "tps_paper": est.PAPER_TABLE3[s.model.name]["privatelora"]})
    return rows


def _print_report(report: dict, scenarios: list[est.Scenario], paper: bool) -> None:
    s = scenarios[0]
    console.print(f"[bold]decode tok/s[/] · cloud {s.cloud.name} · device {s.device.name} {s.device.bandwidth_gbs:g} GB/s · "
                  f"link {s.link.up_mbps:g} Mbit/s up, {s.link.down_mbps:g} down, RTT {s.link.rtt_ms:g} ms · "
                  f"rank {s.rank} on {','.join(t.removesuffix('_proj') for t in s.targets)} · {s.activation_bits:g}-bit activations")
    for x in scenarios:
        table = Table(title=f"{x.model.name} ({x.model.total_params / 1e9:.2f} B parameters)", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                      caption="ms per token; M, head, model run on the edge; · = not part of that method")
        table.add_column("method", no_wrap=True)
        for col in (*TERM_COLUMNS.values(), "total", "tok/s", *(("paper", "diff") if paper else ())):
            table.add_column(col, justify="right")
        for row in (r for r in report["rows"] if r["model"] == x.model.name):
            terms = [f"{row['ms_per_token'][k]:.2f}" if k in row["ms_per_token"] else "·" for k in TERM_COLUMNS]
            cells = [row["method"], *terms, f"{row['total_ms']:.2f}", f"[bold]{row['tps_estimated']:.1f}[/]"]
            if paper:
                p = row["tps_paper"]
                cells += ["-", ""] if p is None else [f"{p:g}", f"{row['tps_estimated'] / p - 1:+.1%}"]
            table.add_row(*cells)
        print_table(table)

    if report["cloud_term"] == "measured":
        rates = ", ".join(f"{x.cloud_tps:g}" for x in scenarios)
        source = "the paper's measured cloud-only rates (transformers, one A100)" if paper else "the measured rate given by --cloud-tps"
        console.print(f"cloud: {source}, {rates} tok/s, used as TPS_cloud for cloud-only and PrivateLoRA")
    else:
        console.print(f"cloud: fp16 weights read per token / ({s.cloud.bandwidth_gbs:g} GB/s x {s.cloud.efficiency:g}) "
                      f"+ FLOPs / {s.cloud.tflops:g} TFLOP/s; PrivateLoRA's cloud reads the decoder layers and A, B")
    console.print(f"edge: fp16 M and LM head read at {s.device.bandwidth_gbs:g} GB/s x {s.device.efficiency:g} + FLOPs / "
                  f"{s.device.tflops:g} TFLOP/s; device-only reads the whole model at {s.device_only_bits:g}-bit")
    if paper:
        d = next(r for r in report["rows"] if r["method"] == "device-only" and r["tps_paper"] is not None)
        console.print(f"device-only: the paper's {d['tps_paper']:g} (a 4-bit run, not one of its estimated rows) is "
                      f"{d['tps_paper'] / d['tps_estimated']:.0%} of this bound; --device-efficiency scales every edge term")
        blog = ", ".join(f"{r['tps_estimated']:.1f} ({r['tps_estimated'] / r['tps_paper'] - 1:+.1%})" for r in report["blog_traffic_rows"])
        console.print(f"Table 3 matches traffic as the blog counts it, one rank-r vector per layer each way "
                      f"(r x 2 x layers x 16 bit; q, k, v send three): PrivateLoRA {blog}")
    for m in report["models"]:
        console.print(f"link, {m['model']}: {m['bits_up'] / 1e3:,.1f} kbit up, {m['bits_down'] / 1e3:,.1f} kbit down, "
                      f"{m['round_trips']} round trips per token")

    rtts = list(report["rtt_sweep"][0]["tps_by_rtt_ms"])
    sweep = Table(title="decode tok/s with a round-trip time", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  caption=f"PrivateLoRA waits on every exchange ({s.plan.round_trips_per_token if len(scenarios) == 1 else 'layers x cuts + 1'} "
                          "per token); cloud-only streams its tokens and device-only has no link")
    for col in ("model", "method", *(f"RTT {r} ms" for r in rtts)):
        sweep.add_column(col, justify="left" if col in ("model", "method") else "right")
    for row in report["rtt_sweep"]:
        sweep.add_row(row["model"], row["method"], *(f"{v:.2f}" for v in row["tps_by_rtt_ms"].values()),
                      end_section=row["method"] == est.METHODS[-1])
    print_table(sweep)
