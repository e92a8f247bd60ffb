"""alpha-beta model of the clipping step's communication at 7B/70B scale (8 -> 1024 GPUs).

    python -m dist_stab.bench.cost_model --json docs/cost_model.json --plot docs/cost_model.png

Assumptions (printed with the table):

* NCCL all-reduce of B bytes over n ranks costs ``c0 + min(ring, tree)`` with
  ring = 2 (n-1) (a + B / (n b)) and tree = 2 ceil(log2 n) a + 2 B / b, where a (per-hop latency)
  and b (per-GPU bandwidth) are those of the slowest link the group crosses: NVLink inside a
  node (8 GPUs), InfiniBand across nodes. ``c0`` is the fixed launch/sync cost of one
  collective; c0 + 2a = 24 us matches the 2-GPU NVLink 4-byte all-reduce measured on the H200
  host (docs: gpu-stack.md).
* Layout: TP = 8 inside a node, PP stages across nodes, DP = N / (TP x PP), ZeRO-1/dist-opt
  sharding over DP. Per-tensor methods reduce a vector of two fp32 per tensor of the stage (sum of squares,
  presence; StableSPAM: one per statistic) over
  TP and then over the DP shard group; nothing crosses PP. Global methods (global clipping,
  ZClip, AdaGC's 100 warm-up steps) reduce one scalar over the whole grad-stats group
  (DP x TP x PP, as Megatron's distributed optimizer does): every rank waits for every stage.
* Dependent rounds are added (they cannot overlap): Stable-SPAM does a MAX then a SUM round.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

INTRA = dict(a=2e-6, b=200e9)  # NVLink: per-hop latency, per-GPU bandwidth (bytes/s)
INTER = dict(a=6e-6, b=45e9)  # InfiniBand NDR 400 Gb/s per GPU, with proxy overhead
C0 = 20e-6  # fixed cost of one NCCL collective (launch + sync)
GPUS_PER_NODE = 8


def allreduce_s(n: int, nbytes: float, crosses_nodes: bool) -> float:
    if n <= 1:
        return 0.0
    link = INTER if crosses_nodes else INTRA
    ring = 2 * (n - 1) * (link["a"] + nbytes / (n * link["b"]))
    tree = 2 * math.ceil(math.log2(n)) * link["a"] + 2 * nbytes / link["b"]
    return C0 + min(ring, tree)


@dataclass
class Model:
    name: str
    layers: int
    d: int
    ff: int
    tensors_per_layer: int = 9  # q, k, v, o, gate, up, down, 2 norms

    def stage_tensors(self, pp: int) -> int:
        return math.ceil(self.layers / pp) * self.tensors_per_layer + 2  # + embedding or head and final norm


MODELS = {"7B": Model("7B", 32, 4096, 11008), "70B": Model("70B", 80, 8192, 28672)}


def layout(n: int, model: str):
    tp = min(GPUS_PER_NODE, n)
    pp_max = 4 if model == "7B" else 16
    pp = max(1, min(pp_max, n // tp))
    dp = n // (tp * pp)
    return tp, pp, dp


def step_cost(n: int, model: str):
    m = MODELS[model]
    tp, pp, dp = layout(n, model)
    p = m.stage_tensors(pp)
    vec = 4 * p  # one fp32 per tensor (StableSPAM's max and sum)
    vec_t = 8 * p  # the transforms: (sum of squares, presence) per tensor
    dp_cross = tp * dp > GPUS_PER_NODE or dp > 1 and tp == GPUS_PER_NODE
    per_tensor = allreduce_s(tp, vec_t, False) + allreduce_s(dp, vec_t, dp_cross)
    per_tensor_4 = allreduce_s(tp, vec, False) + allreduce_s(dp, vec, dp_cross)
    world = allreduce_s(n, 4, n > GPUS_PER_NODE)
    # SCALE: per-row sums of the TP row-parallel weights (o, down: d rows each per layer) over TP;
    # under dist-opt flat partitions also every matrix's rows over DP (q,k,v,o: d; gate, up: ff/tp; down: d).
    layers = math.ceil(m.layers / pp)
    rows_tp = 4 * layers * 2 * m.d
    rows_dp = 4 * layers * (5 * m.d + 2 * m.ff // tp)
    scale = allreduce_s(tp, rows_tp, False) + allreduce_s(dp, rows_dp, dp_cross)
    return {
        "tp": tp, "pp": pp, "dp": dp, "tensors_per_stage": p,
        "global_clip_us": world * 1e6,
        "zclip_us": world * 1e6,
        "adagc_exact_us": per_tensor * 1e6,
        "adagc_shard_local_us": 0.0,
        "gradient_stabilizer_us": per_tensor * 1e6,
        "stable_spam_us": 2 * per_tensor_4 * 1e6,
        "scale_us": scale * 1e6,
        "global_waits_on_all_stages": pp > 1,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args(argv)
    counts = [8, 16, 32, 64, 128, 256, 512, 1024]
    out = {"assumptions": {"intra": INTRA, "inter": INTER, "c0_s": C0, "gpus_per_node": GPUS_PER_NODE},
           "rows": {m: {str(n): step_cost(n, m) for n in counts} for m in MODELS}}
    print(__doc__.split("\n\n", 1)[1])
    print(f"links: NVLink a={INTRA['a']*1e6:.0f} us, b={INTRA['b']/1e9:.0f} GB/s; IB a={INTER['a']*1e6:.0f} us, "
          f"b={INTER['b']/1e9:.0f} GB/s; c0={C0*1e6:.0f} us per collective\n")
    for m in MODELS:
        print(f"## {m}: clipping communication per step (us)\n")
        print("| GPUs | TP x PP x DP | global clip | AdaGC exact | AdaGC shard-local | GradientStabilizer | "
              "Stable-SPAM | SCALE |\n|---|---|---|---|---|---|---|---|")
        for n in counts:
            r = out["rows"][m][str(n)]
            print(f"| {n} | {r['tp']}x{r['pp']}x{r['dp']} | {r['global_clip_us']:.0f}"
                  f"{' (all stages)' if r['global_waits_on_all_stages'] else ''} | {r['adagc_exact_us']:.0f} | 0 | "
                  f"{r['gradient_stabilizer_us']:.0f} | {r['stable_spam_us']:.0f} | {r['scale_us']:.0f} |")
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, m in zip(axes, MODELS):
            rows = out["rows"][m]
            for key, label in [("global_clip_us", "global clip / ZClip (world group, all PP stages)"),
                               ("adagc_exact_us", "AdaGC exact / GradientStabilizer (TP + DP)"),
                               ("stable_spam_us", "Stable-SPAM (MAX + SUM rounds)"), ("scale_us", "SCALE row sums")]:
                ax.plot(counts, [rows[str(n)][key] for n in counts], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{m}: TP 8 x PP x DP")
            ax.set_xlabel("GPUs")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("modelled communication per step (us)")
        axes[0].legend(fontsize=7)
        fig.suptitle("alpha-beta model; AdaGC shard-local: 0 (no collective)")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
