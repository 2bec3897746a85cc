"""Generate BENCHMARKS.md from the committed JSON under tuning_logs/: every table and every figure.

    python scripts/make_benchmarks.py            # write BENCHMARKS.md
    python scripts/make_benchmarks.py --check    # exit 1 with a unified diff if BENCHMARKS.md differs

Sources: the job summaries tuning_logs/*_summary.json (scripts/tune_sd_*.py), the benchmark outputs
tuning_logs/bench/*.json (scripts/bench_*.py, scripts/eval_cost_model.py), the records
tuning_logs/*.jsonl.xz (workload JSON by key, timing repeats), and tuning_logs/bench/provenance.json
for what a file does not record itself (command lines, machine). Workload names are computed by
`Workload.name` from the workload JSON (a row's own, else the records' for its key); a row without
either keeps its stored name. Geomeans are geometric. Needs no TVM and no GPU.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import lzma
import math
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.registry import MARGIN, UNSTABLE, servable  # noqa: E402
from scheduler.verify import TOLERANCES  # noqa: E402
from shapetune.workload import Workload  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROVENANCE = "bench/provenance.json"
LINEAR = "sm90_h200_sd15_linear_summary.json"
GEGLU = "sm90_h200_sd15_geglu_summary.json"
CONV = "sm90_h200_sd15_conv_summary.json"
ATTENTION = "sm90_h200_sd15_attention_summary.json"
NORMS = "sm90_h200_sd15_norms_summary.json"
ELEMENTWISE = "sm90_h200_sd15_elementwise_summary.json"
NORM_BUCKETS = "sm90_h200_sd15_norms_buckets_summary.json"
NORM_GAPS = "sm90_h100_sd15_norms_gaps_summary.json"  # tuned on an H100, 2026-12-07: the buckets nothing served
VAE_GRID = "sm90_h100_sd15_vae_summary.json"  # tuned on an H100, 2026-12-07: the VAE decoder's norm/elementwise buckets
ADD_NORM = "sm90_h100_sd15_add_layer_norm_summary.json"  # H100, 2026-12-07: residual add + LayerNorm buckets
GN_SPLIT = "sm90_h100_sd15_gn_split_buckets_summary.json"  # H100, 2026-12-07: norm_cuda_split_bucket at 1x512
GN_SHIFT = "sm90_h100_sd15_gn_shift_summary.json"  # H100, 2026-12-08: norm2 with conv1's bias + time embedding
NORMS_ROWS = "sm90_h200_sd15_norms_rows_summary.json"  # norm_cuda_rows on the 18 GroupNorms of batch 2, 512²
NORMS_BENCH = "bench/bench_norms_h200.json"
CONV_BENCH = "bench/bench_conv_h200.json"
COPY_YARDSTICK = "bench/bench_copy_yardstick_h200.json"
METASCHEDULE = "bench/bench_metaschedule_h200.json"
BUCKETS = "bench/bench_buckets_h200.json"
COST_MODEL = "bench/cost_model_eval.json"
LOOKUP = "bench/bench_lookup_cpu.json"
E2E = "bench/bench_e2e_h200.json"
E2E_PREV = "bench/bench_e2e_h200_2026-12-02.json"  # an earlier matrix (other DBs, two more shapes)
E2E_NORMS = "bench/bench_e2e_h200_norms_served.json"  # a later run: every norm bucket served; cut in compile_ro
E2E_PACK = "bench/bench_e2e_packing.json"  # packed q/k/v and time-embedding projections, A/B in one run
E2E_ISO = "bench/bench_e2e_h100_isolated.json"  # every mode in its own process (bench_e2e --isolate)
E2E_MATRIX = "bench/bench_e2e_h100_matrix.json"  # the other shapes of issue 10's matrix, each mode in its own process
E2E_FIXED = "bench/bench_e2e_h100_after_fixes.json"  # after the two graph fixes of 2026-12-07, each mode in its own process
E2E_SEQ = "bench/bench_e2e_h100_profile.json"  # the same day, modes in turn in one process, with profiles
PACKING = "bench/bench_packing_h100_{shape}.json"  # scripts/bench_packing.py, per shape
PACKING_SHAPES = ("2x512", "1x512")
PIPELINE_H100 = "bench/bench_pipeline_h100.json"
GRID = "sm90_h200_sd15_grid_summary.json"
HOST_PER_OP_GPU = "bench/bench_host_per_op_h200.json"
HOST = "bench/bench_host_h200.json"
HOST_PER_OP = "bench/bench_host_per_op_cpu.json"
PIPELINE = "bench/bench_pipeline_h200.json"
LORA = "bench/bench_lora_h200.json"
LORA_H100 = "bench/bench_lora_h100.json"  # with capture_parts; shapetune_warm = every capture after the full warm-ups
LORA_HOTSWAP = "bench/bench_lora_hotswap_h100.json"  # bench_lora --hotswap: in-place switches into one adapter
E2E_ALN = "bench/bench_e2e_h100_aln.json"  # add_layer_norm served; shapetune_noaln = without it, same run
# the between-op fusions with their opt-outs in one run: shapetune_noaln (add_layer_norm), shapetune_noshift
# (conv1's bias + time embedding in norm2's GroupNorm)
E2E_FUSIONS = "bench/bench_e2e_h100_fusions.json"
PIPELINE_ALL = "bench/bench_pipeline_all_h100.json"  # bench_pipeline --pipelines: every pipeline of issue 10
COVERAGE = "bench/bench_coverage_h200.json"
COVERAGE_SDXL = "bench/bench_coverage_sdxl_h200.json"

# Goals (issue 4, for an H100) and floors: targets, not measurements.
GOAL_VS_VENDOR = 1.0  # conv2d, attention: geomean ratio vs the vendor path
GOAL_OF_COPY = 0.8  # GroupNorm, LayerNorm: geomean share of copy bandwidth
GOAL_BUCKET_EFFICIENCY, FLOOR_BUCKET_EFFICIENCY = 0.99, 0.95
# Two measurements of one cuDNN call (two runs) that differ by more than this factor are flagged.
RUN_DISAGREEMENT = 1.5
# What a bracketed baseline variant in bench_tuned's "vendors" measures, e.g. "...group_norm[nchw]".
VARIANT_TEXT = {"nchw": "the same torch op on a contiguous NCHW tensor, as eager diffusers runs it"}
DEFAULT_LAYOUT = "channels_last"  # what bench_tuned's default ("vendor_us") GroupNorm baseline is fed


# -- numbers and tables ------------------------------------------------------------------------

def geomean(xs) -> float:
    """Geometric mean of positive numbers: exp(mean(log x)). ValueError on none or a non-positive one."""
    xs = list(xs)
    if not xs:
        raise ValueError("geomean of no values")
    if min(xs) <= 0:
        raise ValueError(f"geomean needs positive values, got {min(xs)}")
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def mean(xs) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        raise ValueError("mean of no values")
    return sum(xs) / len(xs)


def num(x: float | None, nd: int = 2) -> str:
    return "" if x is None else f"{x:.{nd}f}"


def span(xs, nd: int = 2) -> str:
    xs = list(xs)
    return f"{min(xs):.{nd}f}-{max(xs):.{nd}f}"


def table(cols: list[tuple[str, str]], rows: list[list[str]]) -> str:
    """A Markdown table; cols are (header, "l" or "r")."""
    head = "| " + " | ".join(h for h, _ in cols) + " |"
    rule = "| " + " | ".join("---:" if a == "r" else "---" for _, a in cols) + " |"
    return "\n".join([head, rule] + ["| " + " | ".join(r) + " |" for r in rows])


def bullets(lines: list[str]) -> str:
    return "\n".join(f"- {s}" for s in lines)


def template_of(candidate: str) -> str:
    return candidate.split("[")[0]


def at_least(goal: float, value: float, what: str) -> str:
    return f"≥ {goal:.1f}{what}: {'reached' if value >= goal else 'not reached'}"


def served(m: "Measured") -> bool:
    """The registry's rule (kernels.registry.servable): the tuned kernel is served only where it beats
    the vendor time by MARGIN. A bench_tuned row carries its own decision ("dispatch"), made against the
    fastest vendor path of its run."""
    if "dispatch" in m.row:
        return m.row["dispatch"] == "tuned"
    return servable(m.tuned_us, m.vendor_us)


def dispatch_text(vendor: str, res: list["Measured"]) -> str:
    """What the registry's rule picks for these workloads."""
    faster = sum(map(served, res))
    if faster == 0:
        return f"{vendor} everywhere"
    if faster == len(res):
        return "shapetune everywhere"
    return f"{vendor}, except {faster} of {len(res)} where shapetune measured faster by the {MARGIN:.0%} margin"


def registry_sentence(vendor: str, res: list["Measured"]) -> str:
    """The same rule as dispatch_text, as a sentence with the counts."""
    faster, n = sum(map(served, res)), len(res)
    by = f"at least {MARGIN:.0%} faster than {vendor} (the registry's margin)"
    if faster == 0:
        return f"None of the {n} measured {by}, so the registry sends all of them to {vendor}."
    if faster == n:
        return f"All {n} measured {by}, so the registry sends all of them to the tuned kernel."
    return f"{faster} of {n} measured {by}; the registry sends those to the tuned kernel and the others to {vendor}."


# -- the committed data ------------------------------------------------------------------------

@dataclass
class Measured:
    """One workload: the tuned best and the vendor path, both measured in one run (per run, if several)."""

    name: str
    workload: Workload | None
    row: dict  # the latest run's row
    tuned_us: float
    vendor_runs: list[tuple[str, float]] = field(default_factory=list)  # (run label, vendor µs)

    @property
    def vendor_us(self) -> float:
        """The fastest of the runs' vendor measurements: never flatters shapetune."""
        return min(us for _, us in self.vendor_runs)

    @property
    def ratio(self) -> float:
        return self.vendor_us / self.tuned_us

    @property
    def dim(self) -> dict[str, int]:
        if self.workload is not None:
            return self.workload.dim
        dims = {}
        for tok in self.name.split("+")[0].split("_"):
            m = re.fullmatch(r"([a-z]+)(\d+)", tok)
            if m:
                dims.setdefault(m[1], int(m[2]))
        return dims


class Logs:
    """Read-only view of tuning_logs/ under `root`; every file is read once."""

    def __init__(self, root: Path):
        self.dir = Path(root) / "tuning_logs"
        self._cache: dict[str, dict] = {}

    def load(self, rel: str) -> dict:
        if rel not in self._cache:
            self._cache[rel] = json.loads((self.dir / rel).read_text())
        return self._cache[rel]

    def meta(self, rel: str, key: str) -> str:
        """A file's own top-level `key`, else its entry in the provenance file."""
        own = self.load(rel).get(key)
        if own is not None:
            return own
        entry = self.load(PROVENANCE)["files"].get(rel, {})
        if key not in entry:
            raise ValueError(f"{rel}: no {key!r} in the file or in {PROVENANCE}")
        return entry[key]

    def meta_or_none(self, rel: str, key: str) -> str | None:
        """`meta`, or None where neither the file nor the provenance file has `key`."""
        try:
            return self.meta(rel, key)
        except ValueError:
            return None

    def runs(self, rel: str) -> list[dict]:
        d = self.load(rel)
        return d["runs"] if "runs" in d else [d]

    @cached_property
    def records_by_file(self) -> dict[str, list[dict]]:
        """{file name: its lines (records and baselines)} of every tuning_logs/*.jsonl.xz, by name."""
        out = {}
        for p in sorted(self.dir.glob("*.jsonl.xz")):
            with lzma.open(p, "rt") as f:
                out[p.name] = [json.loads(line) for line in f if line.strip()]
        return out

    @cached_property
    def records(self) -> list[dict]:
        return [r for rs in self.records_by_file.values() for r in rs]

    @cached_property
    def workloads_by_key(self) -> dict[str, Workload]:
        """Every recorded workload, under the key it was stored with: Workload.key's hash of the JSON as
        written, so that a later change to Workload's JSON cannot unlink old summary rows from it."""
        out = {}
        for r in self.records:
            if isinstance(r.get("workload"), dict):
                canon = json.dumps(r["workload"], sort_keys=True, separators=(",", ":"))
                out[hashlib.sha256(canon.encode()).hexdigest()[:20]] = Workload.from_json(r["workload"])
        return out

    def workload(self, row: dict) -> Workload | None:
        own = row.get("workload_json") or (row["workload"] if isinstance(row.get("workload"), dict) else None)
        if own:
            return Workload.from_json(own)
        return self.workloads_by_key.get(row.get("key"))

    def name(self, row: dict, stored: str = "workload") -> str:
        w = self.workload(row)
        return w.name if w is not None else row[stored]

    def op(self, m: Measured) -> str:
        if m.workload is not None:
            return m.workload.op
        return next(op for op in ("group_norm", "layer_norm", "conv2d", "linear", "geglu", "attention")
                    if m.name.startswith(op + "_"))

    def measured(self, row: dict, tuned: str, run: str) -> Measured:
        if row.get(tuned) is None or row.get("vendor_us") is None:
            raise ValueError(f"{row['workload']}: no {tuned} or vendor_us in {run}")
        return Measured(self.name(row), self.workload(row), row, row[tuned], [(run, row["vendor_us"])])

    def summary_results(self, rel: str) -> list[Measured]:
        """A job summary's workloads, one per key, in the order of their latest row. A workload reported
        by several runs keeps its latest row and every run's vendor time."""
        merged: dict[str, Measured] = {}
        for run in self.runs(rel):
            label = run.get("run", run["date"]).split(" ")[0]
            for row in run["rows"]:
                m = self.measured(row, "best_us", label)
                old = merged.pop(row["key"], None)
                if old is not None:
                    m.vendor_runs = old.vendor_runs + m.vendor_runs
                merged[row["key"]] = m
        return list(merged.values())

    def trials(self, rel: str, keys: set[str]) -> str:
        """The trial budgets of the runs that tuned these workloads, e.g. "32 + 6"."""
        ts = [run["trials"] for run in self.runs(rel) if any(r["key"] in keys for r in run["rows"])]
        return " + ".join(str(t) for t in dict.fromkeys(ts))

    def dates(self, *rels: str) -> str:
        ds = {run.get("date") or self.meta(rel, "date") for rel in rels for run in self.runs(rel)}
        return ", ".join(sorted(ds))

    def card(self, rel: str) -> str:
        t = self.runs(rel)[0]["target"]
        s = (f"{t['device_name']} ({t['arch']}; CUDA {t['cuda_version']}, torch {t['torch_version']}, "
             f"TVM {t['tvm_version']})")
        machine = self.meta_or_none(rel, "machine")
        return f"{s}, {machine}" if machine else s

    def tvm(self, rel: str) -> str:
        """TVM's major.minor version, e.g. "0.27"."""
        return ".".join(self.runs(rel)[0]["target"]["tvm_version"].split(".")[:2])

    def command(self, rel: str) -> str:
        """The command line, checked against the file's trial count where it has one."""
        cmd = self.meta(rel, "command")
        trials = {run["trials"] for run in self.runs(rel) if "trials" in run}
        if trials and not any(f"--trials {t}" in cmd for t in trials):
            raise ValueError(f"{rel}: command {cmd!r} disagrees with trials {sorted(trials)}")
        return cmd

    @cached_property
    def repeats(self) -> str:
        return "/".join(str(r) for r in sorted({rec["latency"]["repeats"] for rec in self.records
                                                 if rec.get("latency")}))


def clash_note(res: list[Measured]) -> list[str]:
    """A caption line when distinct workloads (keys) share a name, else nothing."""
    shared = [n for n, k in Counter(m.name for m in res).items() if k > 1]
    if not shared:
        return []
    return [f"Names: {len(shared)} names below each stand for more than one workload (different keys): "
            "`Workload.name` does not yet tell them apart (issue 8 item 5)."]


def ratio_figures(results: list[Measured], vendor: str) -> str:
    rs = [m.ratio for m in results]
    return f"{geomean(rs):.2f}x {vendor} ({span(rs)}x)"


# -- sections ----------------------------------------------------------------------------------

def intro(logs: Logs) -> str:
    current = [rel for rel in (NORMS_BENCH, CONV_BENCH) if "run_id" in logs.load(rel)]  # bench_tuned since issue 8
    return (
        "Every ratio is against a baseline measured in the same run on the same card: ratio = baseline time / "
        "shapetune time (> 1: shapetune faster). GPU timing: warm-up, CUDA events around each call while the GPU "
        "is held busy (launch cost excluded), inputs rotated through several input sets so calls read from DRAM, "
        f"median of {logs.repeats} calls; every kernel is verified against a float64 reference on fresh "
        "NaN-poisoned runs before it is timed. Runs with the current runner "
        f"({', '.join(f'`{r}`' for r in current)}) rotate over at least twice the L2 per rotation for every "
        "workload and require every input unchanged after the call; the older runs capped the rotation at 64 input "
        "sets, which for the smallest workloads stayed under twice the L2 (issue 8 item 7). "
        "Raw numbers: `tuning_logs/*_summary.json` and `tuning_logs/bench/`. "
        "This file is generated from them by `python scripts/make_benchmarks.py`; edit that script, not this file.")


@dataclass
class Family:
    label: str
    workloads: int
    trials: str
    versus: str
    goal: str
    dispatch: str


def linear_family(logs: Logs) -> Family:
    res = logs.summary_results(LINEAR)
    return Family("linear (GEMM)", len(res), logs.trials(LINEAR, {m.row["key"] for m in res}),
                  f"{geomean(m.ratio for m in res):.2f}x cuBLAS", "(none)",
                  dispatch_text("cuBLAS", res))


def geglu_family(logs: Logs) -> Family:
    res = logs.summary_results(GEGLU)
    return Family("GEGLU, fused", len(res), logs.trials(GEGLU, {m.row["key"] for m in res}),
                  f"{geomean(m.ratio for m in res):.2f}x diffusers path", "(none)",
                  dispatch_text("diffusers path", res))


def kernel_size(m: Measured) -> str:
    return f"{m.dim['kh']}x{m.dim['kw']}"


def by_kernel_size(res: list[Measured]) -> str:
    groups = defaultdict(list)
    for m in res:
        groups[kernel_size(m)].append(m.ratio)
    return ", ".join(f"{k} {geomean(v):.2f}x" for k, v in sorted(groups.items(), reverse=True))


def conv_results(logs: Logs) -> list[Measured]:
    """The conv re-benchmark's rows: each best record rebuilt, re-verified and timed next to cuDNN in one run."""
    rows = logs.load(CONV_BENCH)["rows"]
    bad = [r for r in rows if r.get("status") != "ok"]
    if bad:
        raise ValueError(f"{CONV_BENCH}: {len(bad)} rows failed re-verification, e.g. {bad[0]['workload']}")
    return [logs.measured(r, "tuned_us", "bench") for r in rows]


def conv_family(logs: Logs) -> Family:
    res = conv_results(logs)
    g = geomean(m.ratio for m in res)
    return Family("conv2d (NHWC)", len(res), logs.trials(CONV, {m.row["key"] for m in res}),
                  f"{g:.2f}x cuDNN ({by_kernel_size(res)})", at_least(GOAL_VS_VENDOR, g, "x"),
                  dispatch_text("cuDNN", res))


def attention_family(logs: Logs) -> Family:
    res = logs.summary_results(ATTENTION)
    g = geomean(m.ratio for m in res)
    return Family("attention", len(res), logs.trials(ATTENTION, {m.row["key"] for m in res}),
                  ratio_figures(res, "SDPA"), at_least(GOAL_VS_VENDOR, g, "x"),
                  dispatch_text("SDPA", res))


@dataclass
class NormRow:
    """One row of scripts/bench_tuned.py's JSON for a memory-bound op."""

    m: Measured
    op: str

    @property
    def of_copy(self) -> float:
        """Share of the copy yardstick's bandwidth, as bench_tuned computed it (with bytes: by GB/s)."""
        return self.m.row["tuned_frac_of_copy"]

    @property
    def vendor_of_copy(self) -> float:
        return self.m.row["vendor_frac_of_copy"]

    def variant_us(self, variant: str) -> float | None:
        return next((us for name, us in self.m.row.get("vendors", {}).items() if name.endswith(f"[{variant}]")),
                    None)


NORM_LABEL = {"group_norm": "GroupNorm (+SiLU)", "layer_norm": "LayerNorm"}


def timed(row: dict) -> bool:
    """Whether bench_tuned re-verified and timed the kernel, the torch default and the copy."""
    return row.get("status") == "ok" and all(row.get(k) for k in ("tuned_us", "vendor_us", "copy_us"))


def norm_rows(logs: Logs) -> list[NormRow]:
    """The benchmark's timed memory-bound rows."""
    rows = [logs.measured(r, "tuned_us", "bench") for r in logs.load(NORMS_BENCH)["rows"] if timed(r)]
    return [NormRow(m, logs.op(m)) for m in rows if logs.op(m) in NORM_LABEL]


def untimed_norms(logs: Logs) -> str:
    """A sentence naming the rows the benchmark could not time (re-verification failed), else ""."""
    bad = [f"`{logs.name(r)}` ({r.get('status')})" for r in logs.load(NORMS_BENCH)["rows"] if not timed(r)]
    return f" Not timed, left out of the table and geomeans: {', '.join(bad)}." if bad else ""


def variants(rows: list[NormRow]) -> list[str]:
    """Bracketed baseline variants present in the rows' "vendors", e.g. ["nchw"]."""
    names = {name for r in rows for name in r.m.row.get("vendors", {})}
    return sorted({m[1] for n in names if (m := re.search(r"\[(\w+)\]$", n))})


def torch_label(rows: list[NormRow]) -> str:
    """The default torch baseline's name; for GroupNorm alone with its layout, once a variant is there to tell
    it from (a mixed set keeps the caption's plain "torch")."""
    return f"torch ({DEFAULT_LAYOUT})" if variants(rows) and all(r.op == "group_norm" for r in rows) else "torch"


def norm_versus(rows: list[NormRow]) -> str:
    """Geomeans vs each torch baseline and of copy bandwidth, naming each baseline."""
    parts = [f"{geomean(r.m.ratio for r in rows):.2f}x {torch_label(rows)}"]
    for v in variants(rows):
        us = [(r.variant_us(v), r.m.tuned_us) for r in rows if r.variant_us(v)]
        if us:
            parts.append(f"{geomean(b / t for b, t in us):.2f}x torch[{v}]")
    return ", ".join(parts) + f", {geomean(r.of_copy for r in rows):.2f} of copy bandwidth"


def norm_families(logs: Logs) -> list[Family]:
    rows = norm_rows(logs)
    out = []
    for op in dict.fromkeys(r.op for r in rows):
        sel = [r for r in rows if r.op == op]
        frac = geomean(r.of_copy for r in sel)
        goal = at_least(GOAL_OF_COPY, frac, " of copy")
        if frac < GOAL_OF_COPY:
            goal += f" ({span(r.of_copy for r in sel)})"
        out.append(Family(NORM_LABEL.get(op, op), len(sel), logs.trials(NORMS, {r.m.row["key"] for r in sel}),
                          norm_versus(sel), goal, dispatch_text(torch_label(sel), [r.m for r in sel])))
    return out


def weakest_group_norm(rows: list[NormRow]) -> str:
    """The GroupNorm size (hw) with the lowest share of copy bandwidth, and why it is hard."""
    by_hw = defaultdict(list)
    for r in rows:
        if r.op == "group_norm":
            by_hw[r.m.dim["hw"]].append(r)
    hw, sel = min(by_hw.items(), key=lambda kv: geomean(r.of_copy for r in kv[1]))
    groups = sorted({r.m.dim["n"] * r.m.dim["g"] for r in sel})
    return (f"GroupNorm at {hw} positions is the weak spot: {span(r.of_copy for r in sel)} of copy. It has only "
            f"{'/'.join(map(str, groups))} groups to parallelize over, which is what the split-statistics template "
            "(`norm_cuda_split`) addresses.")


def split_template_note(logs: Logs, rows: list[NormRow]) -> str:
    gn = [r for r in rows if r.op == "group_norm"]
    won = sum(template_of(r.m.row["candidate"]) == "norm_cuda_split" for r in gn)
    trials = dict.fromkeys(run["trials"] for run in logs.runs(NORMS) if "norm_cuda_split" in run.get("run", ""))
    s = (f"That template got {' + '.join(map(str, trials))} trials and won {won} of the {len(gn)} GroupNorm "
         "workloads.")
    templates = {rec["candidate"]["template"] for rec in logs.records if "candidate" in rec}
    if "norm_cuda_rows" not in templates:
        s += (" Another template, `norm_cuda_rows`, reads whole NHWC rows for its statistics; it is written but "
              "has no GPU records yet.")
    elif (logs.dir / NORMS_ROWS).exists():
        d = logs.load(NORMS_ROWS)
        rs = [r for r in d["rows"] if r.get("best_frac_of_copy")]
        s += (f" Another template, `norm_cuda_rows`, reads whole NHWC rows for its statistics: in its own run "
              f"({logs.card(NORMS_ROWS)}, {logs.dates(NORMS_ROWS)}, `{logs.command(NORMS_ROWS)}`; records "
              f"`{NORMS_ROWS.replace('_summary.json', '.jsonl.xz')}`) its best of {d['trials']} trials reached "
              f"{span(r['best_frac_of_copy'] for r in rs)} of copy bandwidth (geomean "
              f"{geomean(r['best_frac_of_copy'] for r in rs):.2f}) on the {len(rs)} GroupNorm workloads, "
              f"{geomean(r['ratio_vs_vendor'] for r in rs):.2f}x torch there (geomean): no better than the other two "
              "templates, so the hw4096 rows stay near half of copy.")
    return s


def summary(logs: Logs) -> str:
    fams = [linear_family(logs), geglu_family(logs), conv_family(logs), attention_family(logs),
            *norm_families(logs)]
    gpu = [LINEAR, GEGLU, ATTENTION, NORMS_BENCH, CONV_BENCH]
    cards = ", ".join(sorted({logs.runs(rel)[0]["target"]["device_name"] for rel in gpu}))
    rows = norm_rows(logs)
    tvm = logs.tvm(LINEAR)
    return "\n\n".join([
        f"## Summary: SD 1.5 UNet op families (batch 2, 512², fp16), {cards}, {logs.dates(*gpu)}",
        "Each figure is a geomean over the family's distinct workloads. Each workload's ratio is against the vendor "
        "path, measured in the same run. Details and commands are in the sections below. "
        f"\"dispatches to\" applies the registry's rule (the tuned kernel only where it measured at least {MARGIN:.0%} "
        "faster than the fastest vendor path of the same run) to these numbers.",
        table([("family", "l"), ("workloads", "r"), ("trials each", "r"), ("shapetune vs vendor", "l"),
               ("issue 4 goal (H100)", "l"), ("registry dispatches to", "l")],
              [[f.label, str(f.workloads), f.trials, f.versus, f.goal, f.dispatch] for f in fams]),
        f"The compute-bound families are held back by one limit. TVM {tvm}'s tensor-core schedules (dlight, "
        "MetaSchedule, our templates) emit WMMA/mma.sync only, and launch with at most 48 KB of shared memory. "
        "Reaching cuBLAS/cuDNN/FlashAttention needs the Hopper path: wgmma + TMA through TIRx "
        "(`../shared/TVM_NOTES.md`).",
        f"The memory-bound families run {span((r.m.ratio for r in rows), 1)}x faster than {torch_label(rows)}. "
        f"{weakest_group_norm(rows)} {split_template_note(logs, rows)}" + norm_version_note(logs),
    ])


def norm_version_note(logs: Logs) -> str:
    """Where the shipped norm records are all of an older definition than this code's (shapetune.ops OpDef
    version): their figures are of those kernels, and prebuild re-verifies and re-times them."""
    from scheduler.templates import current_version

    ops = ("group_norm", "layer_norm", "add_layer_norm")
    recs = [r for r in logs.records if r.get("type") == "record" and r["workload"]["op"] in ops]
    now = {r["candidate"].get("version", "") == current_version(r["candidate"]["template"], r["workload"]["op"])
           for r in recs}
    if not recs or True in now:
        return ""
    return (" Every shipped norm record (its figures here too) is of the statistics before the shifted moments of "
            "2026-12-08 (shapetune/ops/norm.py: definition version 2, which no longer loses precision where a "
            "group's |mean| >> std). On a GPU those records are candidates, not served: `shapetune prebuild` "
            "re-verifies and re-times them as version 2 (one extra register load and one subtract per element; "
            "not yet timed on a GPU).")


def linear(logs: Logs) -> str:
    res = logs.summary_results(LINEAR)
    trials = logs.load(LINEAR)["trials"]
    dl = [m.vendor_us / m.row["dlight_us"] for m in res]
    return "\n\n".join([
        "## Linear (GEMM), SD 1.5 UNet at batch 2, 512², fp16: exact shapes",
        bullets([f"Card: {logs.card(LINEAR)}. Date: {logs.dates(LINEAR)}.",
                 f"Command: `{logs.command(LINEAR)}`",
                 "Baseline: `torch.nn.functional.linear` (cuBLAS/cuBLASLt), measured in that run. Search: "
                 f"{trials} measured candidates per workload (WMMA template plus dlight), ranked by the XGBoost "
                 "model. dispatch: the faster of shapetune and cuBLAS in this run.", *clash_note(res)]),
        table([("workload", "l"), ("shapetune µs", "r"), ("dlight µs", "r"), ("cuBLAS µs", "r"),
               ("ratio vs cuBLAS", "r"), ("dispatch", "l")],
              [[m.name, num(m.tuned_us), num(m.row["dlight_us"]), num(m.vendor_us), num(m.ratio),
                "shapetune" if served(m) else "cuBLAS"] for m in res]),
        f"Geomean ratio: {geomean(m.ratio for m in res):.2f}. TVM's dlight default alone: {geomean(dl):.2f}. "
        f"TVM {logs.tvm(LINEAR)}'s tensor-core schedules (WMMA, which compiles to mma.sync) reach "
        f"{span(m.ratio for m in res)}x cuBLAS on Hopper. {registry_sentence('cuBLAS', res)} "
        "Closing the gap needs wgmma/TMA templates (the Hopper item on the roadmap).",
    ])


def metaschedule(logs: Logs) -> str:
    d = logs.load(METASCHEDULE)
    ok = sum(r["ms_records_ok"] for r in d["rows"])
    failed = sum(r["ms_records_failed"] for r in d["rows"])
    return "\n\n".join([
        f"## Same trial budget: MetaSchedule, dlight and shapetune ({d['dtype'].replace('float', 'fp')})",
        bullets([f"Card: {logs.card(METASCHEDULE)}. Date: {logs.dates(METASCHEDULE)}.",
                 f"Command: `{logs.command(METASCHEDULE)}`",
                 "Method: each kernel is rebuilt and measured by the same verified runner in one run. The baseline "
                 "is cuBLAS from that run. MetaSchedule: `tune_tir` with the `cuda-tensorcore` space and "
                 f"{d['trials']} trials."]),
        table([("shape", "l")] + [(h, "r") for h in (
            "MetaSchedule µs", "dlight µs", "shapetune µs", "cuBLAS µs", "MetaSchedule ratio", "dlight ratio",
            "shapetune ratio", "MS tune s", "MS ok / failed")],
              [[logs.name(r), num(r["metaschedule_us"]), num(r["dlight_us"]), num(r["shapetune_us"]),
                num(r["cublas_us"])] + [num(r["cublas_us"] / r[f"{k}_us"], 3)
                                        for k in ("metaschedule", "dlight", "shapetune")]
               + [num(r["ms_tune_s"], 0), f"{r['ms_records_ok']} / {r['ms_records_failed']}"]
               for r in d["rows"]]),
        f"{failed} of {ok + failed} MetaSchedule tensor-core samples failed to build on TVM "
        f"{logs.tvm(METASCHEDULE)} (the tvm_access_ptr float16/float32 bug), so {d['trials']} trials leave it "
        "few valid kernels.",
    ])


def buckets(logs: Logs) -> str:
    d = logs.load(BUCKETS)
    rows = d["rows"]
    eff = [r["exact_us"] / r["bucket_us"] for r in rows]
    worst = min(rows, key=lambda r: r["exact_us"] / r["bucket_us"])
    g, lo = geomean(eff), min(eff)
    above = sum(e > 1 for e in eff)
    return "\n\n".join([
        f"## Shape buckets: one kernel per bucket ({d['op']}, fp16)",
        bullets([f"Card: {logs.card(BUCKETS)}. Date: {logs.dates(BUCKETS)}.",
                 f"Command: `{logs.command(BUCKETS)}`, run after `{logs.meta(BUCKETS, 'after')}` on the same DB.",
                 "Method: efficiency = time of a kernel tuned for exactly s / time of the bucket kernel on s. Both "
                 f"are timed on s in the same run, and both searches get {d['trials']} trials. Buckets follow "
                 "policy pow2-v1. A bucket kernel is scored by the geometric mean of its times at the bucket's upper "
                 "bound, middle and lower bound."]),
        table([("shape s", "l"), ("bucket", "l"), ("exact-tuned µs", "r"), ("bucket kernel µs", "r"),
               ("cuBLAS µs", "r"), ("efficiency", "r")],
              [[r["shape"], r["bucket"], num(r["exact_us"]), num(r["bucket_us"]), num(r["vendor_us"]), num(e, 3)]
               for r, e in zip(rows, eff)]),
        f"Geomean efficiency: {g:.3f} (goal {GOAL_BUCKET_EFFICIENCY}: "
        f"{'reached' if g >= GOAL_BUCKET_EFFICIENCY else 'not reached'}). "
        f"Minimum: {lo:.3f}, at {worst['shape']}: {'below' if lo < FLOOR_BUCKET_EFFICIENCY else 'above'} the "
        f"{FLOOR_BUCKET_EFFICIENCY} floor. {above} of {len(rows)} values are above 1: search variance between two "
        f"{d['trials']}-trial searches.",
        "In `tuning_logs/sm90_h200_sd15_linear_buckets_summary.json`, each bucket's µs is the geomean over its "
        "three timing sizes. The vendor figure is taken the same way.",
        *bucket_families(logs),
    ])


#: issue 12 item 2: bucket efficiency per family on off-representative shapes
GOAL_FAMILY_GEOMEAN, GOAL_FAMILY_MIN = 0.97, 0.90


def bucket_families(logs: Logs) -> list[str]:
    """scripts/bench_buckets.py --family F runs other than linear's, one file each
    (bench/bench_buckets_<F>_<card>.json, card h200 or h100: the card itself from the file's target and the
    provenance file); [] while none is committed."""
    files = sorted(p for card in ("h200", "h100") for p in (logs.dir / "bench").glob(f"bench_buckets_*_{card}.json"))
    if not files:
        return []
    summary, details, invocations = [], [], []
    for p in files:
        rel = f"bench/{p.name}"
        d = logs.load(rel)
        eff = [r["exact_us"] / r["bucket_us"] for r in d["rows"]]
        g, lo = geomean(eff), min(eff)
        ok = g >= GOAL_FAMILY_GEOMEAN and lo >= GOAL_FAMILY_MIN
        summary.append([d["op"], d["target"]["device_name"], str(len(eff)), str(d["trials"]), num(g, 3), num(lo, 3),
                        "reached" if ok else "not reached", logs.dates(rel)])
        if (inv := logs.meta_or_none(rel, "invocation")) and inv not in invocations:
            invocations.append(inv)
        note = logs.meta_or_none(rel, "note")
        details += [f"### {d['op']}: `{logs.command(rel)}` ({logs.card(rel)})",
                    *([f"- {note}"] if note else []),
                    table([("shape s", "l"), ("bucket", "l"), ("exact-tuned µs", "r"), ("bucket kernel µs", "r"),
                           ("vendor µs", "r"), ("efficiency", "r")],
                          [[r["shape"], r["bucket"], num(r["exact_us"]), num(r["bucket_us"]), num(r["vendor_us"]),
                            num(e, 3)] for r, e in zip(d["rows"], eff)])]
    linear_trials = logs.load(BUCKETS)["trials"]
    few = sorted({logs.load(f"bench/{p.name}")["trials"] for p in files} - {linear_trials})
    lines = ["Same method, one run per family; each family's exact and bucket searches get the same trials. The "
             "card column names each row's GPU (machine and versions under each family's table below): an efficiency "
             "compares two kernels timed on that card in one run."]
    if few and max(few) < linear_trials:
        lines.append(f"Trials: {' or '.join(map(str, few))} per search (the trials column) is a small budget against "
                     f"the {linear_trials} of the linear table above: an efficiency within a few percent of 1 is "
                     "within the variance of two short searches, either way; a gap that a template explains (see a "
                     "family's note) is not.")
    lines += [f"Run as: `{inv}`; each file's command reruns one family." for inv in invocations]
    return [f"### Per family (issue 12 goal: geomean >= {GOAL_FAMILY_GEOMEAN}, minimum >= {GOAL_FAMILY_MIN})",
            bullets(lines),
            table([("family", "l"), ("card", "l"), ("shapes", "r"), ("trials", "r"), ("geomean efficiency", "r"),
                   ("minimum", "r"), ("goal", "l"), ("date", "l")], summary),
            *details]


def _bucket_group(name: str) -> str:
    """A bucket's kind for the grid tables: the op and its epilogue, e.g. "bias_add+residual"."""
    op = next(o for o in ("bias_add", "gelu_gate", "group_norm", "add_layer_norm", "layer_norm") if name.startswith(o + "_"))
    epi = name.rsplit("_f16", 1)[-1].lstrip("+").replace("affine+", "").replace("affine", "")
    return op + (f" + {epi}" if epi else "")


MODEL_CALL = {"unet": "UNet step", "vae": "VAE decode"}


def grid_job_estimate(d: dict) -> list[str]:
    """A scripts/tune_sd_grid.py job's budget and estimate as bullets; [] for a job without them (the
    tune_sd_norms.py / tune_sd_elementwise.py summaries)."""
    if "estimate" not in d:
        return []
    m, e = d["meta"], d["estimate"]
    timed = [r for r in d["rows"] if r.get("best_us") and r.get("vendor_us")]
    tuned_calls = sum(r.get("calls") or 0 for r in timed if (r.get("served_us") or r["vendor_us"]) < r["vendor_us"])
    per = " + ".join(("one " if n == 1 else f"{n:g} x ") + MODEL_CALL.get(k, k) for k, n in m["models"].items())
    untimed = len(d["rows"]) - len(timed)
    return [f"Budget: its {e['wall_s']:.0f} s timed {e['tasks_timed']} of the {m['buckets']} buckets over the grid's "
            f"{m['shapes']} shapes, the most paying first ({m['skipped_tuned']} skipped as already tuned, {untimed} "
            "not reached: those keep torch's kernels).",
            f"Estimate over the timed buckets (calls x time per {e['per_name']}, i.e. per {per}): "
            f"{num(e['vendor_ms_per'], 1)} ms on torch's kernels, {num(e['served_ms_per'], 2)} ms as served; "
            f"{tuned_calls:g} of the {m['calls_in_buckets']:g} op calls in the grid's buckets run a kernel tuned by "
            "this job."]


def grid_buckets(logs: Logs) -> str:
    """The shape-grid bucket jobs: the elementwise passes and the norm buckets, tuned kernel vs torch's
    kernels for the same work, both timed in the job's run."""
    parts = ["## Shape-grid buckets: the elementwise passes and the norms (fp16)"]
    jobs = [(ELEMENTWISE, "the elementwise passes (gelu_gate; bias_add: a conv's bias (+ residual | + "
                          "time embedding)) against torch's kernels for the same pass", "calls in the grid"),
            (NORM_BUCKETS, "GroupNorm (+SiLU) / LayerNorm buckets over batch and positions against "
                           "F.group_norm (+ F.silu) on channels_last / F.layer_norm", "calls in the grid")]
    optional = [  # jobs whose summaries a checkout may lack
        (NORM_GAPS, "the norm buckets of the SD 1.5 UNet at 1x512, 2x512, 4x512, 2x768 and 2x512x768 "
                    "that no shipped record served (--skip-tuned), against F.group_norm (+ F.silu) on "
                    "channels_last / F.layer_norm", "calls per UNet forward"),
        (VAE_GRID, "the norm and elementwise buckets of the SD 1.5 VAE decoder over batch 1-2 at 512², "
                   "768², 512x768 and 768x512 (scripts/tune_sd_grid.py --models vae; buckets already "
                   "tuned skipped), against F.group_norm (+ F.silu) on channels_last and torch's kernels "
                   "for the same bias pass", "calls in the grid"),
        (ADD_NORM, "add_layer_norm (a transformer block's residual add and the LayerNorm after it, one "
                   "kernel) buckets of the SD 1.5 UNet at 2x512, 1x512, 4x512, 2x768 and 2x512x768, "
                   "against torch's add then F.layer_norm", "calls per UNet forward"),
        (GN_SPLIT, "the GroupNorm (+SiLU) buckets of the SD 1.5 UNet at 1x512 with the split-statistics "
                   "bucket template only (norm_cuda_split_bucket), against F.group_norm (+ F.silu) on "
                   "channels_last", "calls per UNet forward"),
        (GN_SHIFT, "each ResnetBlock2D's norm2 (+SiLU) reading conv1's output with conv1's bias and the time "
                   "embedding added as it reads (group_norm's shift step), buckets of the SD 1.5 UNet at 2x512, "
                   "against torch's two adds then F.group_norm + F.silu on channels_last", "calls per UNet forward"),
    ]
    jobs += [j for j in optional if (logs.dir / j[0]).exists()]
    for rel, what, calls_label in jobs:
        d = logs.load(rel)
        groups: dict[str, list[dict]] = {}
        for r in d["rows"]:
            if r.get("best_us") and r.get("vendor_us"):
                groups.setdefault(_bucket_group(r["workload"]), []).append(r)
        note = logs.load(PROVENANCE)["files"].get(rel, {}).get("note")
        parts.append(bullets([f"Card: {logs.card(rel)}. Date: {logs.dates(rel)}. Command: `{logs.command(rel)}`" +
                              (f" ({note})" if note else "") + ".",
                              f"What: {what}; each row one bucket kind, over its tuned buckets (policy pow2-v1; a "
                              "bucket kernel timed at its upper bound, middle and lower bound). Speedup: torch µs / "
                              "tuned µs, both from the same run."] + grid_job_estimate(d)))
        rows = []
        for g, rs in sorted(groups.items()):
            sp = [r["vendor_us"] / r["best_us"] for r in rs]
            rows.append([g, str(len(rs)), f"{sum(r.get('calls') or 0 for r in rs):g}", num(geomean(sp)), num(min(sp)),
                         num(max(sp))])
        parts.append(table([("bucket kind", "l"), ("buckets", "r"), (calls_label, "r"),
                            ("speedup geomean", "r"), ("min", "r"), ("max", "r")], rows))
    return "\n\n".join(parts)


def norm_copy_caption(rows: list[NormRow]) -> str:
    if all("bytes" in r.m.row for r in rows):
        return ("Yardstick: an aligned device-to-device copy whose read + write traffic is the op's minimal bytes "
                "(every input read once + the output written once), rounded up to whole buffers, timed like a "
                "kernel. GB/s = bytes / time. \"of copy\" = kernel GB/s / copy GB/s, the share of copy bandwidth "
                "reached.")
    return ("Yardstick: a device-to-device copy of the bytes of x, weight, bias and y; that size copies slower "
            "than an aligned copy of the same traffic (issue 8 item 2), so these \"of copy\" figures run high. "
            "\"of copy\" = copy µs / kernel µs, the share of copy bandwidth reached.")


def large_copy_sentence(lc: dict | None, rows: list[NormRow]) -> str:
    if lc is None:
        return "The large copy failed in this run."
    shares = [r.m.row["copy_gbps"] / lc["gbps"] for r in rows if r.m.row.get("copy_gbps")]
    tuned = [r.m.row["tuned_gbps"] / lc["gbps"] for r in rows if r.m.row.get("tuned_gbps")]
    return (f"A large copy in the same run ({lc['bytes'] / 2**30:.2f} GiB of read + write traffic) reached "
            f"{lc['gbps']:.0f} GB/s; the per-workload copies reach {span(shares)} of that (a copy of a few MB is "
            f"bound by launch and ramp-up, not by DRAM), and shapetune's kernels {span(tuned)} (geomean "
            f"{geomean(tuned):.2f}).")


def yardstick_sentence(logs: Logs) -> str:
    """The old (odd-size) and the aligned copy yardstick, timed side by side in one run, if committed."""
    if not (logs.dir / COPY_YARDSTICK).exists():
        return ""
    d = logs.load(COPY_YARDSTICK)
    rs = [r["old_over_aligned"] for r in d["rows"]]
    return (f" The copy yardstick before issue 8 (two buffers of sum(bytes) / 4 fp16 elements, an odd size) and the "
            f"aligned one were also timed side by side, in one run on {d['target']['device_name']} on {d['date']} "
            f"(`{d['command']}`): old / aligned time {geomean(rs):.3f} geomean ({span(rs, 3)}) over {len(rs)} "
            "workloads, so the odd size cost no measurable bandwidth there.")


def norm_baselines_caption(rows: list[NormRow]) -> str:
    s = ("Baselines: \"torch\" is torch `F.group_norm` (+`F.silu`, unfused, as diffusers runs it) on a "
         "channels_last tensor, which torch's CUDA kernel first makes contiguous (a transpose a channels-last model "
         "pays; issue 8 item 3), and `F.layer_norm`.")
    for v in variants(rows):
        s += f" \"torch[{v}]\": {VARIANT_TEXT.get(v, v)}."
    return s


def norms(logs: Logs) -> str:
    d = logs.load(NORMS_BENCH)
    rows = norm_rows(logs)
    vs = variants(rows)
    gbps = all("tuned_gbps" in r.m.row for r in rows)
    cols = [("workload", "l"), ("shapetune µs", "r"), ("torch µs", "r"), ("ratio vs torch", "r")]
    for v in vs:
        cols += [(f"torch[{v}] µs", "r"), (f"ratio vs torch[{v}]", "r")]
    cols += [("copy µs", "r")] + ([("copy GB/s", "r"), ("shapetune GB/s", "r")] if gbps else [])
    cols += [("shapetune of copy", "r"), ("torch of copy", "r"), ("kernel", "l")]
    body = []
    for r in rows:
        line = [r.m.name, num(r.m.tuned_us), num(r.m.vendor_us), num(r.m.ratio)]
        for v in vs:
            b = r.variant_us(v)
            line += [num(b), num(b / r.m.tuned_us if b else None)]
        line += [num(r.m.row["copy_us"])]
        line += [num(r.m.row["copy_gbps"], 0), num(r.m.row["tuned_gbps"], 0)] if gbps else []
        line += [num(r.of_copy), num(r.vendor_of_copy), template_of(r.m.row["candidate"])]
        body.append(line)
    per_op = " ".join(f"{NORM_LABEL.get(op, op)} alone: {norm_versus([r for r in rows if r.op == op])}."
                      for op in dict.fromkeys(r.op for r in rows))
    torch = torch_label(rows)
    prose = (f"Geomeans over the {len(rows)} workloads: {geomean(r.m.ratio for r in rows):.2f}x {torch} (min "
             f"{min(r.m.ratio for r in rows):.2f}, max {max(r.m.ratio for r in rows):.2f}); "
             f"{geomean(r.of_copy for r in rows):.2f} of copy bandwidth ({torch}: "
             f"{geomean(r.vendor_of_copy for r in rows):.2f}). {per_op} "
             + registry_sentence(torch, [r.m for r in rows]) + untimed_norms(logs))
    if "large_copy" in d:
        prose += " " + large_copy_sentence(d["large_copy"], rows) + yardstick_sentence(logs)
    return "\n\n".join([
        "## GroupNorm (+SiLU) and LayerNorm, SD 1.5 UNet at batch 2, 512², fp16",
        bullets([f"Card: {logs.card(NORMS_BENCH)}. Date: {logs.dates(NORMS_BENCH)}.",
                 f"Tuning: `{logs.command(NORMS)}` (norm_cuda, every workload), then `{logs.meta(NORMS, 'then')}` "
                 "(the split-statistics template). Records: `tuning_logs/sm90_h200_sd15_norms.jsonl.xz`.",
                 f"Benchmark (all columns from this one run): `{logs.meta(NORMS_BENCH, 'command')}`. Each best "
                 "kernel is rebuilt from its knobs, verified again, then timed.",
                 norm_baselines_caption(rows), norm_copy_caption(rows)]),
        table(cols, body),
        prose,
    ])


def geglu(logs: Logs) -> str:
    res = logs.summary_results(GEGLU)
    return "\n\n".join([
        "## GEGLU, fused (one GEMM with the gated epilogue), fp16",
        bullets([f"Card: {logs.card(GEGLU)}. Date: {logs.dates(GEGLU)}.",
                 f"Command: `{logs.command(GEGLU)}`.",
                 "Baseline: diffusers' path (`F.linear` → chunk → `h * F.gelu(g)`), measured in the same run.",
                 *clash_note(res)]),
        table([("workload", "l"), ("shapetune µs", "r"), ("diffusers path µs", "r"), ("ratio", "r")],
              [[m.name, num(m.tuned_us), num(m.vendor_us), num(m.ratio)] for m in res]),
        f"Geomean: {geomean(m.ratio for m in res):.2f}x (min {min(m.ratio for m in res):.2f}, max "
        f"{max(m.ratio for m in res):.2f}). The fused kernel's WMMA GEMM core is the limit: it runs at "
        f"{span(m.ratio for m in res)}x of cuBLAS plus two elementwise kernels. "
        + registry_sentence("the diffusers path", res),
    ])


def disagreeing(m: Measured) -> bool:
    us = [u for _, u in m.vendor_runs]
    return len(us) > 1 and max(us) / min(us) > RUN_DISAGREEMENT


def run_labels(res: list[Measured]) -> list[str]:
    return list(dict.fromkeys(label for m in res for label, _ in m.vendor_runs))


def conv_caveat(res: list[Measured]) -> str:
    both = [m for m in res if len(m.vendor_runs) > 1]
    flagged = [m for m in both if disagreeing(m)]
    runs = sorted({max(m.vendor_runs, key=lambda ru: ru[1])[0] for m in flagged})
    gaps = [max(u for _, u in m.vendor_runs) / m.vendor_us for m in flagged]
    s = (f"cuDNN was timed in every tuning run that reported a workload ({len(both)} of {len(res)} workloads in "
         f"more than one run)")
    if flagged:
        s += (f"; for {len(flagged)} of {len(both)} the slowest and fastest cuDNN times differ by more than "
              f"{RUN_DISAGREEMENT}x ({span(gaps, 1)}x apart, the slowest always in {' / '.join(runs)}): processes "
              "building in parallel had the host fall behind the GPU; the runner now detects this and re-measures")
    return s + "."


def conv(logs: Logs) -> str:
    res = conv_results(logs)
    rs = [m.ratio for m in res]
    fast = [m for m in res if m.ratio >= 1.0]
    sizes = Counter(kernel_size(m) for m in fast)
    g = geomean(rs)
    tuning = logs.summary_results(CONV)
    labels = run_labels(tuning)
    runs = [f"Tuning: `{logs.command(CONV)}`"
            + (f", run {len(labels)} times ({', '.join(labels)}): each later run resumed the job and re-measured "
               "cuDNN" if len(labels) > 1 else "")
            + f" (rows of every run: `tuning_logs/{CONV}`; records: `tuning_logs/sm90_h200_sd15_conv.jsonl.xz`)."]
    if len(labels) > 1:
        runs.append(f"The tuning runs' own times are not used here: {conv_caveat(tuning)} This table re-measures "
                    "both sides in one run instead (the tuning runs' figures, each with its fastest cuDNN time, "
                    f"give {geomean(m.ratio for m in tuning):.2f}x).")
    return "\n\n".join([
        "## conv2d (channels-last implicit GEMM on WMMA), SD 1.5 UNet at batch 2, 512², fp16",
        bullets([f"Card: {logs.card(CONV_BENCH)}. Date: {logs.dates(CONV_BENCH)}.",
                 f"Benchmark (all columns from this one run): `{logs.command(CONV_BENCH)}`. Each workload's best "
                 "record is rebuilt from its knobs, verified again (every input unchanged), then timed next to "
                 "cuDNN. This run's records and baselines: `tuning_logs/sm90_h200_sd15_conv_rebench.jsonl.xz`.",
                 *runs,
                 "Baseline: cuDNN through `F.conv2d` on channels_last tensors, plus the residual add as a separate "
                 "op where shapetune fuses it. torch's default algorithm heuristics apply (`cudnn.benchmark` off), "
                 "as in diffusers.", *clash_note(res)]),
        table([("workload", "l"), ("shapetune µs", "r"), ("cuDNN µs", "r"), ("ratio", "r"),
               ("shapetune TF/s", "r"), ("best", "l"), ("dispatch", "l")],
              [[m.name, num(m.tuned_us), num(m.vendor_us), num(m.ratio), num(m.row.get("tuned_tflops"), 1),
                template_of(m.row["candidate"]), "shapetune" if served(m) else "cuDNN"] for m in res]),
        f"Geomean over the {len(res)} workloads: {g:.2f}x cuDNN. By kernel size: {by_kernel_size(res)}. Range: "
        f"min {min(rs):.2f}, max {max(rs):.2f}. {len(fast)} of {len(res)} are at or above 1.0x"
        + (f" (by kernel size: {', '.join(f'{k}: {n}' for k, n in sorted(sizes.items()))})" if fast else "") + ".",
        f"Goal {at_least(GOAL_VS_VENDOR, g, 'x')}. TVM {logs.tvm(CONV_BENCH)}'s tensor-core path is WMMA-only, the "
        "same limit as for GEMM. " + registry_sentence("cuDNN", res),
    ])


def attention(logs: Logs) -> str:
    res = logs.summary_results(ATTENTION)
    trials = logs.trials(ATTENTION, {m.row["key"] for m in res})
    faster = [m.name for m in res if m.ratio > 1]
    worst = min(res, key=lambda m: m.ratio)
    return "\n\n".join([
        f"## Attention (flash-style on WMMA), SD 1.5 UNet at batch 2, 512², "
        f"{'/'.join(str(h) for h in sorted({m.dim['h'] for m in res}))} heads, fp16",
        bullets([f"Card: {logs.card(ATTENTION)}. Date: {logs.dates(ATTENTION)}.",
                 f"Command: `{logs.command(ATTENTION)}`. Records: `tuning_logs/sm90_h200_sd15_attention.jsonl.xz`. "
                 f"{trials} measured candidates per workload: the best of a small search, not of the whole space.",
                 "Baseline: torch SDPA (FlashAttention-2 backend) as diffusers' AttnProcessor2_0 calls it, measured "
                 "in the same run.", *clash_note(res)]),
        table([("workload", "l"), ("shapetune µs", "r"), ("SDPA µs", "r"), ("ratio", "r"),
               ("shapetune TF/s", "r"), ("best", "l")],
              [[m.name, num(m.tuned_us), num(m.vendor_us), num(m.ratio), num(m.row.get("best_tflops"), 1),
                m.row["best"]] for m in res]),
        f"Geomean: {geomean(m.ratio for m in res):.2f}x SDPA (min {worst.ratio:.2f}, max "
        f"{max(m.ratio for m in res):.2f}). Faster than SDPA: "
        + (", ".join(f"`{n}`" for n in faster) if faster else "none")
        + f". The weak case is `{worst.name}` ({worst.ratio:.2f}x): S, P and each O chunk round-trip through shared "
        "memory, because WMMA fragments can't be addressed per element; K/V loads are synchronous; tiles are "
        "capped at 48 KB. The next step is mma.sync/wgmma with register-resident S and P. "
        + registry_sentence("SDPA", res),
    ])


REBENCH = "_rebench.jsonl.xz"  # bench_tuned's exports (one run each), not tuning runs


def utc_dates(recs: list[dict]) -> str:
    """The UTC dates of these lines' `created` times, e.g. "2026-11-27"."""
    from datetime import datetime, timezone

    return ", ".join(sorted({datetime.fromtimestamp(r["created"], timezone.utc).strftime("%Y-%m-%d")
                             for r in recs if r.get("created")}))


def verification_error(logs: Logs) -> str:
    """Relative L2 error (max_rel_err) of every verified record, per op and template, against the bound."""
    groups = defaultdict(list)
    for r in logs.records:
        if r.get("type") == "record" and r.get("status") == "ok" and r.get("max_rel_err") is not None:
            groups[(r["workload"]["op"], r["workload"]["dtype"], r["candidate"]["template"])].append(r)
    dtypes = sorted({d for _, d, _ in groups})
    rows = []
    for (op, dt, tpl), rs in sorted(groups.items()):
        errs = [r["max_rel_err"] for r in rs]
        bound = TOLERANCES[dt][2]
        rows.append([op, tpl, dt, str(len(rs)), f"{min(errs):.2e}", f"{max(errs):.2e}", f"{bound:.0e}",
                     f"{bound / max(errs):.0f}x"])
    every = [r["max_rel_err"] for rs in groups.values() for r in rs]
    return "\n\n".join([
        "## Verification error of the committed kernels",
        bullets([f"Source: every verified record (status ok) in `tuning_logs/*.jsonl.xz`: "
                 f"{', '.join(f'`{n}`' for n in logs.records_by_file)}. Dates: {utc_dates(logs.records)}.",
                 "Metric: `max_rel_err` = ‖out − ref‖ / ‖ref‖ against the float64 reference, the worst of the "
                 "record's verification trials (fresh inputs each; every checked member of a bucket). Bound: "
                 "the relative L2 limit of `scheduler/verify.py` for the dtype; headroom = bound / largest error.",
                 ]),
        table([("op", "l"), ("template", "l"), ("dtype", "l"), ("verified records", "r"), ("min error", "r"),
               ("max error", "r"), ("bound", "r"), ("headroom", "r")], rows),
        f"Over all {len(every)} verified records ({'/'.join(dtypes)}): relative L2 error {min(every):.2e}-"
        f"{max(every):.2e}, of one size for every op and template.",
    ])


def vendor_noise(logs: Logs) -> str:
    """Run-to-run spread and disturbed timings of the vendor baselines of the tuning runs: the data
    behind kernels.registry's MARGIN and UNSTABLE."""
    files = [n for n in logs.records_by_file if not n.endswith(REBENCH)]
    base = [dict(r, file=n) for n in files for r in logs.records_by_file[n] if r.get("type") == "baseline"]
    runs = defaultdict(dict)  # (file, workload, vendor path) -> {run_id: baseline}
    for b in base:
        runs[(b["file"], json.dumps(b["workload"], sort_keys=True), b["name"])][b["run_id"]] = b

    def med(b):
        return b["latency"]["median_us"]

    def dist(b):
        return b["latency"]["median_us"] / b["latency"]["min_us"]

    pairs = [list(v.values()) for v in runs.values() if len(v) > 1]
    spread = {id(p): max(map(med, p)) / min(map(med, p)) - 1 for p in pairs}
    by_op = defaultdict(lambda: ([], []))
    for b in base:
        by_op[b["workload"]["op"]][0].append(b)
    for p in pairs:
        by_op[p[0]["workload"]["op"]][1].append(p)
    rows = []
    for op, (bs, ps) in sorted(by_op.items()):
        sp = [spread[id(p)] for p in ps]
        rows.append([op, str(len(bs)), str(len(ps)), f"{statistics_median(sp):.1%}" if sp else "",
                     f"{sum(x <= 0.03 for x in sp)}" if sp else "", f"{max(sp):.0%}" if sp else "",
                     str(sum(dist(b) <= UNSTABLE for b in bs)), str(sum(dist(b) > UNSTABLE for b in bs))])
    sp = sorted(spread.values())
    wide = [p for p in pairs if spread[id(p)] > MARGIN]
    wide_disturbed = sum(any(dist(b) > UNSTABLE for b in p) for p in wide)
    calm = [dist(b) for b in base if dist(b) <= UNSTABLE]
    rough = [dist(b) for b in base if dist(b) > UNSTABLE]
    ex_pair = max((p for p in pairs if any(dist(b) > UNSTABLE for b in p)),
                  key=lambda p: max(map(dist, p)), default=None)
    example = ""
    if ex_pair:
        bad = max(ex_pair, key=dist)
        other = min((b for b in ex_pair if b is not bad), key=med)
        example = (f" The most disturbed one timed twice: {Workload.from_json(bad['workload']).name}, median "
                   f"{med(bad):.2f} µs, fastest sample {bad['latency']['min_us']:.2f} µs, where its other run's "
                   f"median is {med(other):.2f} µs.")
    counts = ", ".join(f"{len(ps)} {op}" for op, (_, ps) in sorted(by_op.items()) if ps)
    return "\n\n".join([
        "## Vendor timing noise: where the registry's margins come from",
        bullets([f"Card: {base[0]['target']['device_name']}. Dates: {utc_dates(base)}.",
                 f"Source: the vendor baselines of the tuning runs, {len(base)} timings in "
                 f"{', '.join(f'`tuning_logs/{n}`' for n in files)} (the `*{REBENCH}` files, one re-benchmark "
                 "run each, left out). A resumed job re-measures the vendor path, so some workloads have it "
                 "timed in two runs.",
                 "Spread: slower / faster median of one vendor path on one workload, timed in two runs, minus 1. "
                 "Disturbed: a timing whose median is over UNSTABLE x its fastest sample."]),
        table([("op", "l"), ("vendor timings", "r"), ("timed in 2 runs", "r"), ("median spread", "r"),
               ("spread ≤ 3%", "r"), ("max spread", "r"), (f"median/fastest ≤ {UNSTABLE}", "r"),
               (f"> {UNSTABLE}", "r")], rows),
        f"Run to run: over the {len(sp)} workloads whose vendor path was timed in two runs ({counts}), the two "
        f"medians differ by a median of {statistics_median(sp):.1%}, and by at most 3% for "
        f"{sum(x <= 0.03 for x in sp)} of {len(sp)}. The registry's MARGIN ({MARGIN:.0%}: a tuned kernel is served "
        "only where tuned × (1 + MARGIN) ≤ the vendor time of its run) sits above that noise. "
        f"{len(wide)} differ by more than {MARGIN:.0%} ({span([spread[id(p)] * 100 for p in wide], 0)}%)"
        + (f"; {wide_disturbed} of them have a disturbed timing in the pair." if wide else "."),
        disturbed_sentence(calm, rough, len(base)) + example,
    ])


def disturbed_sentence(calm: list[float], rough: list[float], n: int) -> str:
    """How the timings' median / fastest-sample ratios fall on either side of UNSTABLE."""
    if not rough:
        return f"Disturbed timings: none of {n} (median / fastest sample ≤ {max(calm):.2f})."
    return (f"Disturbed timings: {len(calm)} of {n} have median / fastest sample ≤ {max(calm):.2f}, the other "
            f"{len(rough)} ≥ {min(rough):.2f}. The registry's UNSTABLE ({UNSTABLE}x) lies in that gap: a disturbed "
            "vendor timing stands for its fastest sample, a lower bound on the vendor time, not its median.")


def statistics_median(xs) -> float:
    xs = sorted(xs)
    n = len(xs)
    if not n:
        raise ValueError("median of no values")
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


COST_COLS = [("in_family@1", "in-family @1"), ("in_family@4", "@4"), ("in_family@8", "@8"),
             ("transfer@1", "transfer @1"), ("transfer@4", "@4"), ("random@1", "random @1"), ("random@4", "@4")]


def cost_model_means(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean of each metric over the held-out workloads, per op and over all ("all")."""
    out = {}
    for op in sorted({r["op"] for r in rows}) + ["all"]:
        sel = [r for r in rows if op in ("all", r["op"])]
        out[op] = {k: mean(r.get(k) for r in sel) for k, _ in COST_COLS + [("in_family_spearman", "")]}
        out[op]["workloads"] = len(sel)
    return out


def cost_model(logs: Logs) -> str:
    d = logs.load(COST_MODEL)
    s = cost_model_means(d["rows"])
    a = s["all"]
    worse = [op for op in s if op != "all" and s[op]["transfer@1"] < s[op]["random@1"]]
    per_workload = Counter(json.dumps(r["workload"], sort_keys=True) for r in logs.records
                           if r.get("type") == "record" and isinstance(r.get("workload"), dict))
    by_op = defaultdict(int)
    for w, n in per_workload.items():
        op = json.loads(w)["op"]
        by_op[op] = max(by_op[op], n)
    absent = [f"{op} (at most {n} records per workload)" for op, n in sorted(by_op.items()) if op not in s]
    return "\n\n".join([
        "## Cost model: ranking held-out workloads (CPU, from the shipped H200 records)",
        bullets([f"Machine: {logs.meta(COST_MODEL, 'machine')}. It needs no GPU, because it re-ranks measured "
                 f"records. Date: {logs.dates(COST_MODEL)}.",
                 f"Command: `{logs.command(COST_MODEL)}`.",
                 f"Method: each workload with at least {d['min_ok']} verified records is held out together with "
                 "its twins, the workloads equal to it but for the epilogue or the dynamic ranges (its "
                 "±bias/±residual variants, the bucket whose representative is its shape; "
                 f"{sum(bool(r.get('twins')) for r in d['rows'])} of {len(d['rows'])} have twins). The XGBoost "
                 "model is trained without them, either on the same op's other workloads (in-family) or on the "
                 "other ops only (transfer), and then ranks the held-out workload's verified candidates. Features "
                 "include the epilogue steps, layout parameters (conv stride/padding) and dynamic ranges, so twins "
                 "are told apart.",
                 "Metric: quality@k = true best latency / best latency among the model's top k. 1.0 means measuring "
                 "k candidates would have found the best. Each figure is the mean over the held-out workloads.",
                 "Baseline: a uniformly random order, computed exactly in the same run.",
                 "Caveat: the records were themselves chosen by an earlier model plus random exploration, so this "
                 "measures ranking among plausible candidates, not over the whole space."]),
        table([("op", "l"), ("held-out workloads", "r")] + [(h, "r") for _, h in COST_COLS]
              + [("Spearman (in-family)", "r")],
              [[op, str(v["workloads"])] + [num(v[k], 3) for k, _ in COST_COLS] + [num(v["in_family_spearman"])]
               for op, v in s.items()]),
        f"Over all {a['workloads']} workloads, the model's first pick reaches {a['in_family@1']:.2f} of the best "
        f"kernel's speed, against {a['random@1']:.2f} for a random pick. Its top 4 reach {a['in_family@4']:.2f}, "
        f"against {a['random@4']:.2f}.",
        f"Transfer to an unseen op family reaches {a['transfer@1']:.2f} at top 1"
        + (", worse than random for " + " and ".join(
            f"{op} ({s[op]['transfer@1']:.2f} against {s[op]['random@1']:.2f})" for op in worse) if worse else "")
        + ". Features learned on one family can mislead on another, which is why the tuner keeps random "
        "exploration in each round."
        + (f" Absent, below the {d['min_ok']} records needed: {', '.join(absent)}." if absent else ""),
    ])


def lookup(logs: Logs) -> str:
    d = logs.load(LOOKUP)
    empty = num(d["empty_call_ns"], 0)
    return "\n\n".join([
        "## Registry lookup (CPU)",
        f"- Machine: {logs.meta(LOOKUP, 'machine')}. Date: {logs.dates(LOOKUP)}. Command: "
        f"`{logs.command(LOOKUP)}`",
        table([("path", "l"), ("ns per call", "r"), ("baseline: empty Python call, ns", "r"), ("budget, ns", "r")],
              [["cached per call signature (every call)", num(d["cached_lookup_ns"], 0), empty,
                str(d["budget_ns"])],
               ["first call of a new shape in a tuned bucket (in-memory index, no DB query)",
                num(d["first_call_new_shape_ns"], 0), empty, "(none)"]]),
    ])


def others_tuned(d: dict, shapes: list[str]) -> str:
    """Per shape after the first, the share of op calls that ran tuned kernels and the ops left untuned."""
    out = []
    for s in shapes[1:]:
        calls = d["rows"]["shapetune"][s]["calls"]
        total = sum(sum(c.values()) for c in calls.values())
        tuned = sum(c.get("tuned", 0) for c in calls.values())
        untuned = sorted(op for op, c in calls.items() if not c.get("tuned"))
        out.append(f"{s} {tuned / total:.0%} of calls tuned (none of {', '.join(untuned)})")
    return "; ".join(out)


E2E_NAMES = {"eager": "eager (NCHW)", "eager_cl": "eager, channels_last", "compile": "torch.compile (default)",
             "compile_ro": "torch.compile(mode=\"reduce-overhead\")",
             "shapetune_eager": "kernels.optimize(unet, graphs=False)", "shapetune": "kernels.optimize(unet): CUDA graphs",
             "shapetune_nopack": "kernels.optimize(unet, fuse_qkv=False, fuse_temb=False): CUDA graphs",
             "shapetune_noaln": "kernels.optimize(unet, fuse_add_norm=False): CUDA graphs",
             "shapetune_noshift": "kernels.optimize(unet, fuse_norm_shift=False): CUDA graphs"}


def e2e_run(logs: Logs, rel: str) -> list[str]:
    """One scripts/bench_e2e.py run: its card and command, the matrix, what ran tuned, the GPU profile."""
    d = logs.load(rel)
    a = d["args"]
    shapes = a["shapes"].split(",")
    rows = []
    for s in shapes:
        for mode, per in d["rows"].items():
            if s not in per:  # a run cut short in this mode (bench_e2e writes after every shape)
                continue
            r = per[s]
            ro = r.get("speedup_vs_compile_ro")
            rows.append([s, E2E_NAMES.get(mode, mode), num(r["us"] / 1e3, 2), num(r["speedup_vs_eager"], 2),
                         num(ro, 2) if ro else "-", num(r.get("first_call_s", r.get("shape_change_s")), 2),
                         num(r.get("peak_mem_gib"), 2), f"{r['rel_l2_vs_eager']:.1e}"])
    first = d["rows"]["shapetune"][shapes[0]]
    tuned = {op: c.get("tuned", 0) for op, c in first["calls"].items() if c.get("tuned")}
    prof = first.get("profile", {}).get("by_category_us", {})
    ro_prof = d["rows"].get("compile_ro", {}).get(shapes[0], {}).get("profile", {}).get("by_category_us", {})
    out = [f"- Card: {logs.card(rel)}. Date: {logs.dates(rel)}. Command: `{logs.command(rel)}`"]
    if records := logs.meta_or_none(rel, "records"):
        out.append("- Records: " + records)
    if note := logs.meta_or_none(rel, "note"):
        out.append("- " + note)
    others = others_tuned(d, shapes)
    out += [
        table([("shape", "l"), ("mode", "l"), ("ms per call", "r"), ("vs eager", "r"), ("vs compile_ro", "r"),
               ("1st call, s", "r"), ("peak, GiB", "r"), ("rel L2 vs eager", "r")], rows),
        f"- Ops that ran tuned kernels at {shapes[0]}: " + ", ".join(sorted(tuned)) +
        " (the records of the given DBs that beat torch in their own run; every other call runs torch's op, "
        "counted by cause in the JSON)." + (f" At the other shapes: {others}." if others else ""),
    ]
    if prof:
        out.append(
            f"- GPU time of one shapetune forward at {shapes[0]} by kernel category (torch.profiler, µs): "
            + ", ".join(f"{k} {v:.0f}" for k, v in prof.items())
            + (" (\"gemm\" includes cuBLAS's nvjet kernels" if "gemm" in prof else " (\"other\": cuBLAS nvjet GEMMs")
            + "; \"tvm\": the tuned kernels).")
    if ro_prof:
        out.append(
            f"- GPU time of one torch.compile(mode=\"reduce-overhead\") call at {shapes[0]} (µs): "
            + ", ".join(f"{k} {v:.0f}" for k, v in ro_prof.items())
            + " (inductor's Triton kernels are named after the ops they fuse: a GroupNorm fused with its "
            "convolution's bias counts as \"conv\").")
    return out


def packing_ab(logs: Logs) -> list[str]:
    """scripts/bench_packing.py's runs: packed against unpacked projections under CUDA graphs, in turns in one
    process; [] while none is committed."""
    rels = [PACKING.format(shape=s) for s in PACKING_SHAPES if (logs.dir / PACKING.format(shape=s)).exists()]
    if not rels:
        return []
    rows = []
    for rel in rels:
        d = logs.load(rel)
        med = {k: sorted(v)[len(v) // 2] for k, v in d["medians"].items()}
        rows.append([d["shape"], num(med["packed"] / 1e3, 3), num(med["nopack"] / 1e3, 3),
                     num(med["packed"] / med["nopack"], 3),
                     f"{d['packed']['kernels_per_call']:.0f} / {d['nopack']['kernels_per_call']:.0f}",
                     f"{d['packed']['busy_us']:.0f} / {d['nopack']['busy_us']:.0f}",
                     f"{d['packed']['small_gap_us']:.0f} / {d['nopack']['small_gap_us']:.0f}"])
    d0 = logs.load(rels[0])
    return [
        "### Packed projections under CUDA graphs: in turns, one process",
        f"- Card: {d0['device']}, {logs.meta(rels[0], 'machine')}. Date: {logs.dates(rels[0])}. "
        f"Command: `{logs.command(rels[0])}`",
        "- Records: " + logs.meta(rels[0], "records"),
        f"- The optimized UNet with and without the packed projections (kernels/qkv.py, kernels/temb.py), both "
        f"captured, then timed in {len(d0['medians']['packed'])} alternating rounds (median of each round's "
        "median, ms per call, CUDA events per call); one torch.profiler window over 3 graph replays of each: "
        "kernels per call, GPU busy time (sum of kernel durations, µs per call) and the gaps between kernels "
        "inside the replays (µs per call), packed / unpacked. Absolute times differ between machines of one kind "
        "(each device call may start a fresh one: the optimized UNet took 6.90-6.93 ms at 2x512 in the runs above), "
        "so only the ratio within this run is its result.",
        table([("shape", "l"), ("packed, ms", "r"), ("unpacked, ms", "r"), ("packed / unpacked", "r"),
               ("kernels per call", "r"), ("GPU busy, µs", "r"), ("gaps, µs", "r")], rows),
    ]


def end_to_end(logs: Logs) -> str:
    """SD 1.5 UNet step per mode over a shape matrix, one run per table (scripts/bench_e2e.py), the host
    path (scripts/bench_host.py) and the LoRA switch cost (scripts/bench_lora.py)."""
    d, h, lo = logs.load(E2E), logs.load(HOST)["row"], logs.load(LORA)
    a = d["args"]
    lrow = lo["rows"]
    prev = e2e_run(logs, E2E_PREV) if (logs.dir / E2E_PREV).exists() else []
    later = e2e_run(logs, E2E_NORMS) if (logs.dir / E2E_NORMS).exists() else []
    pack = e2e_run(logs, E2E_PACK) if (logs.dir / E2E_PACK).exists() else []
    iso = e2e_run(logs, E2E_ISO) if (logs.dir / E2E_ISO).exists() else []
    matrix = e2e_run(logs, E2E_MATRIX) if (logs.dir / E2E_MATRIX).exists() else []
    fixed = e2e_run(logs, E2E_FIXED) if (logs.dir / E2E_FIXED).exists() else []
    aln = e2e_run(logs, E2E_ALN) if (logs.dir / E2E_ALN).exists() else []
    fusions = e2e_run(logs, E2E_FUSIONS) if (logs.dir / E2E_FUSIONS).exists() else []
    seq = e2e_run(logs, E2E_SEQ) if (logs.dir / E2E_SEQ).exists() else []
    return "\n\n".join([
        "## End to end: the SD 1.5 UNet step",
        "- SD 1.5 UNet (random weights) fp16; shape = batch x height [x width] in pixels; CUDA events around each "
        "call (median of each command's --iters calls, 15 or 20, after 3 warm-up calls; host launch cost included); the weights "
        "and activations are far over L2, so inputs are not rotated. One model per mode, run over the shapes in "
        "the order listed: \"1st call\" is the wall time of the first call at that shape (at the first shape the "
        "compile or the capture; at the others the cost of a shape change: torch.compile(dynamic=False) "
        "recompiles, shapetune captures one more graph); peak: memory allocated during that shape's calls, weights "
        "included. Ratios against eager and against torch.compile reduce-overhead from the same run.",
        *(["### The newest run: the between-op fusions, each also turned off (shapetune_noaln: add_layer_norm; "
           "shapetune_noshift: conv1's bias and the time embedding in norm2's GroupNorm), every mode in its own "
           "process", *fusions] if fusions else []),
        *([f"### {'An earlier' if fusions else 'The newest'} run: add_layer_norm served, and without it "
           "(shapetune_noaln), every mode in its own process", *aln] if aln else []),
        *([f"### {'An earlier' if aln else 'The newest'} run: after the graph fixes, every mode in its own process",
           *fixed] if fixed else []),
        *([f"### {'An earlier' if fixed else 'The newest'} run: every mode in its own process", *iso] if iso else []),
        *(["### The other shapes of the matrix: every mode in its own process", *matrix] if matrix else []),
        *(["### The same day, modes in turn in one process, with profiles", *seq] if seq else []),
        *packing_ab(logs),
        *(["### Packed projections (q/k/v, time embedding): with and without, one run", *pack] if pack else []),
        *e2e_run(logs, E2E),
        *(["### A later run: every norm bucket served (no torch.compile figure)", *later] if later else []),
        *(["### An earlier run (other records, two more shapes)", *prev] if prev else []),
        "### Host path and LoRA",
        f"- Host path, another run ({logs.load(HOST)['device']}, {logs.meta(HOST, 'machine')}, {logs.dates(HOST)}, `{logs.command(HOST)}`): a patched UNet "
        f"step run eagerly, synchronized wall time {num(h['patched_eager_ms'], 1)} ms against "
        f"{num(h['eager_cl_ms'], 1)} ms for eager channels_last ({num(h['ratio_vs_eager_cl'], 2)}x the time), "
        f"{h['op_calls']} op calls per step.",
        f"- LoRA switch ({logs.card(LORA)}, {logs.dates(LORA)}, `{logs.command(LORA)}`): two rank-{lo['args']['rank']} "
        "PEFT adapters on every attention projection, batch 2, 512²; `set_adapters` plus the first UNet call after "
        f"it, over {len(lrow['shapetune']['switch_s'])} alternating switches: shapetune "
        f"{num(lrow['shapetune']['switch_median_s'] * 1e3, 0)} ms median, {num(max(lrow['shapetune']['switch_s']) * 1e3, 0)} "
        "ms max (the first switch to an adapter captures its graph; the adapter state is part of the graph key, so "
        f"later switches replay), eager {num(lrow['eager']['switch_median_s'] * 1e3, 0)} ms median; steady calls with "
        f"a LoRA active {num(lrow['shapetune']['us'] / 1e3, 1)} ms against {num(lrow['eager']['us'] / 1e3, 1)} ms "
        "eager channels_last.",
        *([lora_parts(logs, LORA_H100)] if (logs.dir / LORA_H100).exists() else []),
        *([lora_parts(logs, LORA_HOTSWAP)] if (logs.dir / LORA_HOTSWAP).exists() else []),
        *([pipeline_table(logs, PIPELINE_ALL, "### Every pipeline: StableDiffusion, Img2Img, Inpaint, AltDiffusion, "
                          "StableDiffusionXL")] if (logs.dir / PIPELINE_ALL).exists() else []),
        *([pipeline_table(logs, PIPELINE_H100, "### The full pipeline: the newest run")]
          if (logs.dir / PIPELINE_H100).exists() else []),
        pipeline_table(logs, PIPELINE, "### The full pipeline" if not (logs.dir / PIPELINE_H100).exists()
                       else "### The full pipeline: an earlier run"),
    ])


def lora_parts(logs: Logs, rel: str) -> str:
    """One bench_lora run with where each switch's capture went (GraphedCall.capture_parts): the switch
    cost per mode, set_adapters alone, and per capture the warm-up runs and the captured run."""
    d = logs.load(rel)
    hot = d["args"].get("hotswap")
    label = {"eager": "eager channels_last", "shapetune": "kernels.optimize" if hot else
             "kernels.optimize (a switch's capture skips the warm-ups)",
             "shapetune_warm": "kernels.optimize, every capture after the full warm-ups (before 58c6d32)",
             "shapetune_peft": "kernels.optimize(fuse_lora_add=False): PEFT's own LoRA forward",
             "compile_ro": 'torch.compile(mode="reduce-overhead")' + (" after enable_lora_hotswap" if hot else "")}
    rows = []
    for mode, r in d["rows"].items():
        parts = r.get("capture_parts") or []
        cap = "; ".join(f"{p['warmups']} warm-up(s) {num(p['warmup_s'] * 1e3, 0)} ms + captured run "
                        f"{num(p['capture_s'] * 1e3, 0)} ms" for p in parts) or "-"
        rows.append([label.get(mode, mode), num(r["us"] / 1e3, 2), num(r["switch_median_s"] * 1e3, 1),
                     num(max(r["switch_s"]) * 1e3, 1),
                     num(sorted(r["set_adapters_s"])[len(r["set_adapters_s"]) // 2] * 1e3, 1),
                     f"{r['rel_l2_vs_eager']:.1e}" if r.get("rel_l2_vs_eager") is not None else "-", cap])
    how = ("one PEFT adapter whose weights each switch overwrites in place with the other LoRA's (diffusers' "
           "`load_lora_adapter(state_dict, hotswap=True)`, the state dict on the CPU as a file loads): the graphs "
           "read the new weights, nothing is captured after the first call; torch.compile got "
           "`enable_lora_hotswap(target_rank)` before the first adapter, diffusers' way to swap without recompiling"
           if hot else
           "two adapters loaded, each switch `set_adapters`. The first switch to each adapter captures its graph (the "
           "adapter state is part of the graph key); later ones replay. Captures: the first is the first call with both "
           "adapters loaded; the second is the first switch to the other adapter")
    return "\n\n".join([
        f"### LoRA switch{' by hotswap' if hot else ''}: the newest run{'' if hot else ', with where its captures went'}",
        f"- Card: {logs.card(rel)}. Date: {logs.dates(rel)}. Command: `{logs.command(rel)}`",
        f"- Rank-{d['args']['rank']} LoRAs on every attention projection, SD 1.5 UNet fp16, batch 2, 512²; "
        f"{d['args']['switches']} alternating switches, each the switch plus the first UNet call after it (synchronized "
        f"wall time): {how}.",
        *(["- rel L2 0: shapetune's outputs equal eager's bit for bit in this run (no tuned kernel was served: the "
           "same vendor kernels, and LoRA layer outputs equal to PEFT's in fp16; which path each LoRA call took is counted in "
           "bench_lora's JSON from the next run on, `lora_linear_calls`)."]
          if all(r.get("rel_l2_vs_eager") == 0 for k, r in d["rows"].items() if k.startswith("shapetune")) else []),
        table([("mode", "l"), ("ms per call", "r"), ("switch + call, median ms", "r"), ("max ms", "r"),
               (f"{'hotswap' if hot else 'set_adapters'} alone, median ms", "r"), ("rel L2 vs eager", "r"),
               ("captures", "l")], rows),
    ])


def host_per_op(logs: Logs) -> str:
    """Host cost per patched module call, eager vs patched, before and after a change, each run with its
    own eager baseline (scripts/bench_host.py --per-op)."""
    d = logs.load(HOST_PER_OP)
    b, a = d["before"]["per_op"], d["after"]["per_op"]
    extra = lambda r: (r["patched_fallback"]["us"] - r["eager"]["us"]) / max(r["patched_fallback"]["op_calls"], 1)  # noqa: E731
    rows = [[kind, str(a[kind]["patched_fallback"]["op_calls"]), num(b[kind]["eager"]["us"], 1), num(b[kind]["patched_fallback"]["us"], 1),
             num(extra(b[kind]), 1), num(a[kind]["eager"]["us"], 1), num(a[kind]["patched_fallback"]["us"], 1), num(extra(a[kind]), 1),
             num(a[kind]["patched_tuned"]["us"], 1)] for kind in a if kind in b]
    return "\n\n".join([
        "## Host path per patched module",
        f"- Machine: {d['machine']}. Date: {d['date']}. Command: `{d['command']}`, on the code before "
        f"(main at {d['before']['code']}) and after ({d['after']['code']}) the per-call plans of kernels/dispatch.py.",
        "- " + d["note"] + " \"fallback\": the patched module over an empty DB (every op call runs torch's op, "
        "counted), so the difference to eager is the patched path's own host work; \"extra\": that difference per "
        "op call. \"llvm-tuned\": the same over a DB with llvm-tuned kernels for every call it can serve; it "
        "includes the TVM kernels' own run time (untuned single-candidate CPU kernels), so it is not host cost alone.",
        table([("module", "l"), ("op calls", "r"), ("eager, before", "r"), ("fallback, before", "r"),
               ("extra per op call, before", "r"), ("eager, after", "r"), ("fallback, after", "r"),
               ("extra per op call, after", "r"), ("llvm-tuned, after", "r")], rows),
        "- µs per module call.",
        *host_per_op_gpu(logs),
    ])


def host_per_op_gpu(logs: Logs) -> list[str]:
    """The same per-module timing on the GPU (fp16, CUDA target; the fallback column only), [] before it ran."""
    if not (logs.dir / HOST_PER_OP_GPU).exists():
        return []
    d = logs.load(HOST_PER_OP_GPU)
    per = d["per_op"]
    rows = [[kind, str(r["patched_fallback"]["op_calls"]), num(r["eager"]["us"], 1), num(r["patched_fallback"]["us"], 1),
             num((r["patched_fallback"]["us"] - r["eager"]["us"]) / max(r["patched_fallback"]["op_calls"], 1), 1)]
            for kind, r in per.items()]
    return [
        f"### On the GPU: {d['device']}, {logs.meta(HOST_PER_OP_GPU, 'machine')}",
        f"- Date: {d['date']}. Command: `{logs.command(HOST_PER_OP_GPU)}` (after the plans). The same modules in fp16 on "
        "the GPU, each call synchronized (so a module's time includes its kernels' launches and run time; these "
        "modules are tiny, so that is mostly launch latency); eager against the patched fallback over an empty DB "
        "(every op call runs torch's op, counted), in turns, the fastest of the repeats. \"extra\" includes any "
        "GPU work the patched path adds (GroupNorm: the patched model keeps channels_last, so torch's fallback "
        "group_norm pays a layout copy back, which a tuned kernel does not).",
        table([("module", "l"), ("op calls", "r"), ("eager", "r"), ("fallback", "r"), ("extra per op call", "r")], rows),
    ]


PIPELINE_NAMES = {"text2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
                  "inpaint": "StableDiffusionInpaintPipeline", "alt": "AltDiffusionPipeline",
                  "sdxl": "StableDiffusionXLPipeline"}


def pipeline_table(logs: Logs, rel: str = PIPELINE, title: str = "### The full pipeline") -> str:
    PIPELINE = rel  # noqa: N806  (the run this table shows)
    d = logs.load(PIPELINE)
    a = d["args"]
    names = {"eager": "eager", "compile_ro": "torch.compile(mode=\"reduce-overhead\") on the UNet and VAE decode",
             "shapetune": "kernels.optimize(pipe)"}
    if isinstance(d["rows"], dict):  # a run before --shapes: one shape, rows by mode
        res = a["res"]
        rows_in = [dict(r, mode=m, shape=f"1x{res}") for m, r in d["rows"].items()]
    else:
        rows_in = d["rows"]
    kinds = list(dict.fromkeys(r.get("pipeline", "text2img") for r in rows_in))  # runs before --pipelines: text2img
    several = kinds != ["text2img"]
    rows = [[*([PIPELINE_NAMES[r["pipeline"]]] if several else []), r["shape"], names.get(r["mode"], r["mode"]),
             num(r["s"], 3), num(r["speedup_vs_eager"], 2),
             num(r["speedup_vs_compile_ro"], 2) if r.get("speedup_vs_compile_ro") else "-",
             num(r["first_call_s"], 2), num(r.get("peak_mem_gib"), 2),
             "(reference)" if r["mode"] == "eager" else num(r["psnr_vs_eager_db"], 1)] for r in rows_in]
    what = (f"- StableDiffusionPipeline at SD 1.5's shapes (random weights), fp16, {a['steps']} DDIM steps with "
            "classifier-free guidance" if not several else
            f"- {', '.join(PIPELINE_NAMES[k] for k in kinds)} (random weights; SD 1.5's UNet and VAE, SDXL base's "
            f"for StableDiffusionXLPipeline), fp16, {a['steps']} steps with classifier-free guidance and a negative "
            "prompt (img2img at strength 1: every step runs; inpaint with a random mask; AltDiffusion from prompt "
            "embeddings: scheduler.pipelines.run_pipeline)")
    out = [
        title,
        f"- Card: {logs.card(PIPELINE)}. Date: {logs.dates(PIPELINE)}. Command: `{logs.command(PIPELINE)}`",
        *([f"- Records: {r}"] if (r := logs.meta_or_none(PIPELINE, "records")) else []),
        what + ", text encoder and VAE decode included; shape = images per prompt x height [x width] "
        "in pixels (the UNet runs at twice that batch); wall time per pipeline call "
        f"(median of {a['iters']} after the first call), PSNR of the images against eager's (same seed and weights). "
        "One pipeline per mode, run over the shapes in the order listed: \"1st call\" is the compile or capture at "
        "the first shape and the cost of a shape change at the others.",
        table([*([("pipeline", "l")] if several else []), ("shape", "l"), ("mode", "l"), ("s per call", "r"),
               ("vs eager", "r"), ("vs compile_ro", "r"), ("1st call, s", "r"), ("peak, GiB", "r"),
               ("PSNR vs eager, dB", "r")], rows),
    ]
    if isinstance(d["rows"], dict):
        vae = d["rows"].get("shapetune", {}).get("graphs", {}).get("vae", {})
        out.append(
            f"- In this run the VAE decode was captured on every pipeline call ({vae.get('captured', 0)} captures, "
            f"{vae.get('replayed', 0)} replays): the pipeline passes a new torch.Generator to `vae.decode` each call, "
            "and the graph signature keyed it by identity. Fixed after this run (the unused argument is dropped, "
            "kernels/pipeline.py), not re-measured yet.")
    else:
        last = [r for r in rows_in if r["mode"] == "shapetune"]
        if last and "graphs" in last[-1]:
            g = last[-1]["graphs"]
            out.append("- shapetune's graphs over the whole run (captured / replayed / eager per component): "
                       + "; ".join(f"{k} {json.dumps(v)}" for k, v in g.items()) + ".")
    return "\n\n".join(out)


def coverage(logs: Logs) -> str:
    """scripts/bench_coverage.py's runs, SD 1.5 and SDXL: at random grid shapes, the share of op calls and of
    GPU time in tuned kernels and the speed against the vendor-only patched model; a section per committed
    JSON ("" while neither is)."""
    return "\n\n".join(t for t in (coverage_of(logs, COVERAGE, "SD 1.5", "1-8x256-1024"),
                                     coverage_of(logs, COVERAGE_SDXL, "SDXL", "1-2x1024")) if t)


def coverage_of(logs: Logs, rel: str, models: str, default_grid: str) -> str:
    if not (logs.dir / rel).exists():
        return ""
    d = logs.load(rel)
    a = d["args"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731  (no GPU profile: a CPU run)
    names = {"unet": "UNet step", "vae": "VAE decode", "sdxl_unet": "SDXL UNet step", "sdxl_vae": "SDXL VAE decode"}
    rows = []
    for model, per in d["rows"].items():
        for s, r in per.items():
            t, v = r["tuned"], r["vendor"]
            rows.append([names.get(model, model), s.replace("x", " x ", 1), num(t["us"] / 1e3, 2), num(v["us"] / 1e3, 2),
                         num(r["speedup_vs_vendor"], 3), f"{t['tuned_calls']}/{t['op_calls']}",
                         pct(t.get("tvm_time_share")), f"{r['rel_l2_vs_vendor']:.1e}"])
    totals = []
    for model, t in d["totals"].items():
        outcomes = ", ".join(f"{k} {n}" for k, n in t["outcomes"].items())
        totals.append(f"{names.get(model, model)}: speedup against vendor-only {num(t['speedup_vs_vendor_geomean'], 3)}x "
                      f"geomean ({num(t['speedup_min'], 3)}-{num(t['speedup_max'], 3)}) over {t['shapes']} shapes; "
                      f"op calls tuned {pct(t['tuned_call_share_mean'])}, GPU time in TVM kernels "
                      f"{pct(t.get('tvm_time_share_mean'))} (means over the shapes); op calls by outcome: {outcomes}.")
    grid = grid_run(logs) if rel == COVERAGE else []
    return "\n\n".join([
        f"## Coverage over the shape grid: {models}",
        *grid,
        bullets([f"Card: {logs.card(rel)}. Date: {logs.dates(rel)}. Command: `{logs.command(rel)}`",
                 *([f"Records: {records}"] if (records := logs.meta_or_none(rel, "records")) else []),
                 f"{len(d['shapes'])} random shapes (seed {a['seed']}) of the grid {a['grid'] or default_grid} "
                 "(batch x height x width in pixels); per model two copies with the same random weights, both "
                 "`kernels.optimize`d: one served from the given records, one from an empty DB (vendor-only: every "
                 "op on torch's path). ms: median per call with CUDA graphs (CUDA events, "
                 f"{a['iters']} calls after {a['warmup']} warm-up); op calls tuned: of one eager forward, by the "
                 "registry's counts; GPU time in TVM kernels: torch.profiler over one eager forward; rel L2: tuned "
                 "output against vendor-only."]),
        table([("model", "l"), ("shape", "l"), ("ms tuned", "r"), ("ms vendor-only", "r"), ("speedup", "r"),
               ("op calls tuned", "r"), ("GPU time in TVM", "r"), ("rel L2", "r")], rows),
        bullets(totals),
    ])


def grid_run(logs: Logs) -> list[str]:
    """The grid job's run (scripts/tune_sd_grid.py): what its budget reached and its estimated gain."""
    if not (logs.dir / GRID).exists():
        return []
    d = logs.load(GRID)
    m, e = d["meta"], d["estimate"]
    steps = m["models"].get("unet")
    return [bullets([
        f"Records: the grid job ({logs.card(GRID)}, {logs.dates(GRID)}): `{logs.command(GRID)}`. The task scheduler "
        f"had {m['buckets']} buckets of {', '.join(m['families'])} over the grid's {m['shapes']} shapes (weights: "
        f"calls per shape, the UNet x {steps:g} steps plus one VAE decode; {m['skipped_tuned']} buckets skipped as "
        f"already shipped); its {e['wall_s']:.0f} s warmed up {e['tasks_timed']} of them, the most paying first.",
        f"Its estimate over those {e['tasks_timed']} buckets (calls x time, per grid shape): {num(e['vendor_ms_per'], 1)} "
        f"ms on the vendor path, {num(e['served_ms_per'], 1)} ms as served: {num(e['gain_ms_per_gpu_min'], 2)} ms "
        "saved per grid shape per GPU-minute of tuning. The coverage below was measured on the same machine after "
        "it, with these records and the shipped ones (see Records).",
    ])]


SECTIONS = (summary, linear, metaschedule, buckets, norms, grid_buckets, geglu, conv, attention, verification_error,
            vendor_noise,
            cost_model, lookup, end_to_end, host_per_op, coverage)


def render(root: Path = ROOT) -> str:
    """BENCHMARKS.md's full text, from the committed JSON under root/tuning_logs."""
    logs = Logs(root)
    return "# Benchmarks\n\n" + intro(logs) + "\n\n" + "\n\n".join(t for t in (f(logs) for f in SECTIONS) if t) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 with a diff if BENCHMARKS.md is out of date")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    a = ap.parse_args()
    text, out = render(), Path(a.out)
    if not a.check:
        out.write_text(text)
        return
    old = out.read_text() if out.exists() else ""
    if old != text:
        sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                                   str(out), "generated"))
        sys.exit(f"{out} is out of date: run python scripts/make_benchmarks.py")


if __name__ == "__main__":
    main()
