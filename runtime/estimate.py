"""PrivateLoRA's analytical decode throughput, term by term (pure arithmetic, no torch).

The paper's model (authors' blog) adds the per-token times of the parts that run one after another:

    TPS = 1 / (1/TPS_cloud + 1/TPS_PL + 1/TPS_head + t_comm)

Every term here is derived from stated inputs. Reading and computing are added, not overlapped
(`bytes / (bandwidth * efficiency) + flops / flop_rate`), so each is an upper bound on time. Decode at
batch 1 reads every weight once per token except the embedding table (one row). KV-cache reads are
left out, as in the paper: the numbers are for short contexts. Unlike the paper, the link can carry
a round-trip time, paid once per exchange; the edge waits on every cut of every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .plan import DEFAULT_TARGETS, SplitPlan

# fp16 weights on both sides, as in the paper.
WEIGHT_BYTES = 2
BITS_PER_BYTE = 8
METHODS = ("device-only", "cloud-only", "privatelora")


@dataclass(frozen=True)
class ModelDims:
    """A Llama-style decoder: untied embedding and LM head, full multi-head attention, gated MLP."""

    name: str
    hidden: int
    layers: int
    vocab: int
    intermediate: int | None = None
    params: int | None = None  # total parameter count; overrides the count from the dimensions

    @property
    def total_params(self) -> int:
        if self.params is not None:
            return self.params
        attention = 4 * self.hidden * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        norms = 2 * self.hidden
        return self.layers * (attention + mlp + norms) + 2 * self.vocab * self.hidden + self.hidden

    def target_dims(self, target: str) -> tuple[int, int]:
        """(in, out) features of an adapted projection: what its A (r x in) and B (out x r) are sized by."""
        d, i = self.hidden, self.intermediate
        if target in ("gate_proj", "up_proj", "down_proj") and i is None:
            raise ValueError(f"{target} is sized by the MLP's intermediate size, which {self.name} does not give")
        return {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d),
                "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}[target]

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def decoder_params(self) -> int:
        """What the cloud holds of the base model under PrivateLoRA: everything but embedding and head."""
        return self.total_params - 2 * self.head_params

    @property
    def params_read_per_token(self) -> int:
        """Whole-model decode: every weight but the embedding table, of which one row is read."""
        return self.total_params - self.head_params


@dataclass(frozen=True)
class Processor:
    name: str
    bandwidth_gbs: float
    tflops: float
    efficiency: float = 1.0  # fraction of the memory bandwidth reached in practice

    def seconds(self, nbytes: float, flops: float) -> float:
        return nbytes / (self.bandwidth_gbs * 1e9 * self.efficiency) + flops / (self.tflops * 1e12)


@dataclass(frozen=True)
class Link:
    up_mbps: float  # edge -> cloud
    down_mbps: float  # cloud -> edge
    rtt_ms: float = 0.0


@dataclass(frozen=True)
class Scenario:
    model: ModelDims
    cloud: Processor
    device: Processor
    link: Link
    rank: int = 128
    targets: tuple[str, ...] = DEFAULT_TARGETS
    activation_bits: float = 16
    device_only_bits: float = 4  # weight bits of the whole model when it runs on the device alone
    cloud_tps: float | None = None  # a measured cloud decode rate, used instead of the bandwidth estimate

    @property
    def plan(self) -> SplitPlan:
        return SplitPlan(self.model.layers, self.targets)

    @property
    def adapter_params(self) -> int:
        """All M (r x r per target per layer): the edge's share of the adapted model."""
        return self.model.layers * len(self.plan.targets) * self.rank * self.rank

    @property
    def ab_params(self) -> int:
        """Frozen A (r x in) and B (out x r) per target per layer, read by the cloud on top of the decoder."""
        return self.model.layers * self.rank * sum(sum(self.model.target_dims(t)) for t in self.plan.targets)


@dataclass(frozen=True)
class Traffic:
    bits_up: float
    bits_down: float
    round_trips: int


def traffic(s: Scenario) -> Traffic:
    """Per token: embedding up and last hidden state down once; per layer `A x` down and `M A x` up, r per target."""
    adapter_values = s.model.layers * len(s.plan.targets) * s.rank
    values = s.model.hidden + adapter_values
    return Traffic(values * s.activation_bits, values * s.activation_bits, s.plan.round_trips_per_token)


@dataclass(frozen=True)
class Terms:
    """Seconds per decoded token spent in each part of a method; parts it does not use are 0."""

    cloud: float = 0.0  # 1 / TPS_cloud: decoder (and A, B) in the cloud, or the whole model for cloud-only
    adapter: float = 0.0  # 1 / TPS_PL: all M on the device
    head: float = 0.0  # 1 / TPS_head: LM head on the device
    device_model: float = 0.0  # the whole quantized model on the device (device-only)
    transfer: float = 0.0  # bits each way / link rate each way
    latency: float = 0.0  # round trips x RTT

    @property
    def total(self) -> float:
        return self.cloud + self.adapter + self.head + self.device_model + self.transfer + self.latency

    @property
    def tps(self) -> float:
        return 1.0 / self.total


def cloud_decoder_seconds(s: Scenario) -> float:
    if s.cloud_tps is not None:
        return 1.0 / s.cloud_tps
    params = s.model.decoder_params + s.ab_params
    return s.cloud.seconds(params * WEIGHT_BYTES, 2 * params)


def privatelora(s: Scenario) -> Terms:
    t = traffic(s)
    m = s.adapter_params
    head = s.model.head_params
    return Terms(
        cloud=cloud_decoder_seconds(s),
        adapter=s.device.seconds(m * WEIGHT_BYTES, 2 * m),
        head=s.device.seconds(head * WEIGHT_BYTES, 2 * head),
        transfer=t.bits_up / (s.link.up_mbps * 1e6) + t.bits_down / (s.link.down_mbps * 1e6),
        latency=t.round_trips * s.link.rtt_ms / 1e3,
    )


def cloud_only(s: Scenario) -> Terms:
    """The loop runs in the cloud and streams tokens back: the link costs no time per token."""
    if s.cloud_tps is not None:
        return Terms(cloud=1.0 / s.cloud_tps)
    params = s.model.params_read_per_token
    return Terms(cloud=s.cloud.seconds(params * WEIGHT_BYTES, 2 * params))


def device_only(s: Scenario) -> Terms:
    params = s.model.params_read_per_token
    return Terms(device_model=s.device.seconds(params * s.device_only_bits / BITS_PER_BYTE, 2 * params))


def estimate(s: Scenario) -> dict[str, Terms]:
    return {"device-only": device_only(s), "cloud-only": cloud_only(s), "privatelora": privatelora(s)}


def with_rtt(s: Scenario, rtt_ms: float) -> Scenario:
    return replace(s, link=replace(s.link, rtt_ms=rtt_ms))


# Model presets: the dimensions of the checkpoints the paper evaluated (Hugging Face configs).
PRESETS: dict[str, ModelDims] = {
    "llama2-7b": ModelDims("llama2-7b", hidden=4096, layers=32, vocab=32000, intermediate=11008),
    "llama2-13b": ModelDims("llama2-13b", hidden=5120, layers=40, vocab=32000, intermediate=13824),
    "llama-30b": ModelDims("llama-30b", hidden=6656, layers=60, vocab=32000, intermediate=17920),
}

# The paper's setting (authors' blog): one A100 80G, an iPhone 13 Pro Max, a 5G link, 16-bit activations,
# rank 128 on q, k, v, no round-trip time.
PAPER_CLOUD = Processor("A100 80G", bandwidth_gbs=1935, tflops=312)
# The paper gives the phone's bandwidth only; 1.713 TFLOP/s is the A15's 5-core GPU FP32 peak
# (5 cores x 128 lanes x 2 x 1.338 GHz). Every device term here is bandwidth-bound, so it barely matters.
PAPER_DEVICE = Processor("iPhone 13 Pro Max", bandwidth_gbs=42.7, tflops=1.713)
PAPER_LINK = Link(up_mbps=60, down_mbps=100, rtt_ms=0)
PAPER_RANK = 128
PAPER_ACTIVATION_BITS = 16
PAPER_DEVICE_ONLY_BITS = 4

# Default bandwidth efficiency of a derived cloud term. The paper's cloud-only rates, measured with
# transformers on one A100, reach 25%, 37% and 55% of the bandwidth bound for 7B, 13B and 30B (a fixed
# per-token overhead weighs most on small models); 0.4 sits in that range. `--cloud-tps` replaces the estimate.
DEFAULT_CLOUD_EFFICIENCY = 0.4

# Table 3, decode tokens/s; None where the paper prints "-".
PAPER_TABLE3: dict[str, dict[str, float | None]] = {
    "llama2-7b": {"device-only": 8.1, "cloud-only": 37.2, "privatelora": 27.1},
    "llama2-13b": {"device-only": None, "cloud-only": 27.8, "privatelora": 20.5},
    "llama-30b": {"device-only": None, "cloud-only": 16.7, "privatelora": 12.9},
}
