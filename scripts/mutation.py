"""Mutation testing of saelib's core: plant one small bug at a time, check that a test fails.

Usage (``make mutation`` runs the default)::

    python scripts/mutation.py                       # every scope, report in _build/mutation/
    python scripts/mutation.py --only sae,afa        # some scopes
    python scripts/mutation.py --named-only          # only the named mutants
    python scripts/mutation.py --list                # print the mutants, run nothing

Two kinds of mutants, both applied to a private copy of the repository (the worktree is never
touched):

* **generated**: an AST walk over each function in scope makes every mutant of a fixed set of
  operators, one at a time: arithmetic (``+ ↔ -``, ``* ↔ /``, ``// → *``, ``** → *``),
  comparisons (``< ↔ <=``, ``> ↔ >=``, ``== ↔ !=``, ``is ↔ is not``, ``in ↔ not in``),
  boolean operators (``and ↔ or``), ``not x → x``, ``-x → x``, augmented assignments, numeric
  constants (``n → n + 1``) and boolean constants (``True ↔ False``). Error paths (``raise``,
  ``assert``, f-strings) are skipped: their mutants only change a message.
* **named**: hand-written bugs (the formula slips a reviewer would worry about: h for h − 1, a
  missing bias atom, an uncentred denominator, lr for 1 − lr, a seed that is ignored ...), each a
  textual replacement that must apply exactly once.

A mutant is *killed* when the scope's tests fail (or error, or exceed the time limit) with it
in place. Tests run in a forked child of a process that has already imported torch, numpy,
pandas and pytest, so a mutant costs its tests, not the interpreter start-up. Each scope runs
only the test files that exercise it (``SCOPES`` below), with ``-x``.

The report (``_build/mutation/report.md`` and ``results.json``) lists the kill rate per scope
and every surviving mutant with its source line.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE_CHECKED = True  # False with --skip-baseline (stated in the report)
NOTES: dict[str, str] = (json.loads((ROOT / "scripts" / "mutation_notes.json").read_text())
                         if (ROOT / "scripts" / "mutation_notes.json").exists() else {})
MAX_RSS_BYTES = 4 * 2**30  # a test run above this is a runaway allocation: the mutant counts as killed
REF = "tests/test_references.py"

# scope name -> (module, functions or Class.method names, pytest arguments)
SCOPES: dict[str, tuple[str, list[str], list[str]]] = {
    "topafa": ("saelib/sae/topafa.py",
               ["_keys", "_cum_norms", "_nearest_prefix", "topafa_select_reference", "_prefix_mask",
                "topafa_select", "_select_rows"],
               [REF + "::test_losses_match_hand_formulas", "tests/test_topafa.py", "-k", "topafa"]),
    "sae": ("saelib/sae/core.py",
            ["SAE.normalize", "SAE.denormalize", "SAE._pre_acts_n", "SAE._target_n", "SAE._select_mask",
             "SAE.forward", "SAE._update_dead", "SAE._update_threshold", "SAE.dead_mask",
             "SAE.set_decoder_norm_to_unit_norm", "SAE.remove_gradient_parallel_to_decoder_directions",
             "_safe_sqrt", "_bag_sum", "_sparse_decode", "_DenseEncode.forward", "_DenseEncode.backward",
             "_GatherPreActs.backward"],
            [REF + "::test_losses_match_hand_formulas", REF + "::test_aux_loss_hand_formula",
             REF + "::test_dead_latent_rule_boundary", REF + "::test_batchtopk_threshold_converges_to_the_known_cut",
             REF + "::test_batchtopk_threshold_on_random_batches", "tests/test_sae.py",
             "-k", "not reproducible_across_threads"]),
    "afa": ("saelib/analysis/afa.py",
            ["epsilon", "welch_bound", "bound_slopes", "f_tilde_atoms", "f_tilde", "f_tilde_sq_norm", "eps_lbo",
             "zf_stats", "_coherence"],
            [REF + "::test_zf_stats_with_bias_hand_computed", REF + "::test_coherence_is_the_weighted_mean_cosine_brute_force",
             REF + "::test_welch_bound_is_met_by_the_simplex", REF + "::test_welch_bound_hand_values",
             REF + "::test_eps_lbo_uses_h_minus_one", REF + "::test_epsilon_and_f_tilde_flags_and_shape_errors",
             "tests/test_afa.py", "-k", "not saelens and not plots"]),
    "metrics": ("saelib/sae/metrics.py", ["ReconstructionMetrics.add", "ReconstructionMetrics.result", "_hist_stats"],
                ["tests/test_metrics.py", REF + "::test_reconstruction_metrics_hand_computed"]),
    "evaluate": ("saelib/analysis/evaluate.py",
                 ["_Accumulator.add", "_Accumulator.add_ce", "_Accumulator.result", "_ce_batch"],
                 [REF + "::test_reconstruction_metrics_hand_computed", REF + "::test_ce_recovered_and_kl_score_brute_force",
                  "tests/test_evaluate.py", "-k", "not plots and not saelens and not llama and not welch_ttest"]),
    "stitching": ("saelib/analysis/stitching.py", ["insertion_delta_mse"],
                  [REF + "::test_insertion_result_reports_both_saes_by_hand", "tests/test_stitching.py",
                   "-k", "not width_family_retrains"]),
    "meta": ("saelib/analysis/meta.py", ["fve", "reconstruct"],
             [REF + "::test_meta_fve_hand_formula", "tests/test_meta.py", "-k", "fve or decompos or meta_fve"]),
    "train": ("saelib/sae/train.py",
              ["TrainConfig.lr_at", "_load_checkpoint", "_accumulate", "_window_record", "_Run.load_state"],
              [REF + "::test_lr_at_hand_values", REF + "::test_trainer_applies_the_schedule",
               REF + "::test_trainer_dead_metric_boundary", "tests/test_train.py"]),
    "activations": ("saelib/lm/activations.py",
                    ["_forward_capture", "harvest", "_index_batches", "tensor_batches"],
                    [REF + "::test_tensor_batches_seed_changes_order_and_epochs_are_permutations",
                     REF + "::test_iter_batches_seed_changes_batches", "tests/test_activations.py",
                     "-k", "not llama and not disk_full and not corrupted and not rejects"]),
    "cache": ("saelib/lm/cache.py", ["ActivationCache.iter_batches"],
              [REF + "::test_iter_batches_seed_changes_batches", "tests/test_activations.py",
               "-k", "cache and not disk_full and not corrupted and not rejects"]),
    "data": ("saelib/lm/data.py", ["iter_token_rows", "_build_rows"],
             ["tests/test_data.py::test_rows_are_exactly_the_stream", "tests/test_data.py::test_seed_determinism_and_prefix",
              "tests/test_data.py::test_iter_token_rows_matches_token_rows",
              "tests/test_data.py::test_cache_is_written_atomically_and_reused"]),
}

# (id, scope, description, old text, new text): each old text must occur exactly once
NAMED: list[tuple[str, str, str, str, str]] = [
    ("afa-paper-target", "sae", "paper-mode AFA loss target ‖x − b_dec‖ instead of ‖x‖",
     "afa = (_safe_sqrt(sq) - x_n.norm(dim=-1)).pow(2).mean()",
     "afa = (_safe_sqrt(sq) - x_cent.norm(dim=-1)).pow(2).mean()"),
    ("zf-no-bias-atom", "afa", "zf_stats: ‖f̃‖² without the ‖b_dec‖² atom",
     "norm_f2[c0 : c0 + chunk] = a.square() @ dn2 + b2",
     "norm_f2[c0 : c0 + chunk] = a.square() @ dn2"),
    ("threshold-sign", "sae", "BatchTopK threshold EMA moves away from the batch cut",
     "self.threshold.lerp_(m, self.cfg.threshold_lr)",
     "self.threshold.lerp_(m, -self.cfg.threshold_lr)"),
    ("threshold-one-minus-lr", "sae", "BatchTopK threshold EMA with 1 − lr in place of lr",
     "self.threshold.lerp_(m, self.cfg.threshold_lr)",
     "self.threshold.lerp_(m, 1 - self.cfg.threshold_lr)"),
    ("lr-warmup-off-by-one", "train", "lr_at warm-up step/w instead of (step+1)/w",
     "return self.lr * (step + 1) / self.warmup_steps",
     "return self.lr * step / self.warmup_steps"),
    ("lr-decay-off-by-one", "train", "lr_at decay fraction without the + 1",
     "frac = (step - (n - self.decay_steps) + 1) / self.decay_steps",
     "frac = (step - (n - self.decay_steps)) / self.decay_steps"),
    ("dead-rule-strict", "sae", "dead-latent rule > instead of >=",
     "return self.tokens_since_fired >= self.cfg.dead_after_tokens",
     "return self.tokens_since_fired > self.cfg.dead_after_tokens"),
    ("kl-score-formula", "evaluate", "kl_score = KL_sae / KL_zero instead of (KL_zero − KL_sae) / KL_zero",
     'metrics["kl_score"] = (kz - metrics["kl_sae"]) / kz if kz else float("nan")',
     'metrics["kl_score"] = metrics["kl_sae"] / kz if kz else float("nan")'),
    ("fve-uncentred", "meta", "meta-SAE FVE denominator Σ‖d‖² (uncentred)",
     "total = (X - X.mean(0)).pow(2).sum()",
     "total = X.pow(2).sum()"),
    ("tensor-batches-ignore-seed", "activations", "tensor_batches ignores its seed",
     "for idx in _index_batches(n, batch_size, shuffle=shuffle, seed=seed, epochs=epochs, n_tokens=n_tokens):",
     "for idx in _index_batches(n, batch_size, shuffle=shuffle, seed=0, epochs=epochs, n_tokens=n_tokens):"),
    ("iter-batches-ignore-seed", "cache", "ActivationCache.iter_batches ignores its seed",
     "for idx in _index_batches(self.n_tokens, batch_size, shuffle=shuffle, seed=seed, epochs=epochs, n_tokens=n_tokens):",
     "for idx in _index_batches(self.n_tokens, batch_size, shuffle=shuffle, seed=0, epochs=epochs, n_tokens=n_tokens):"),
    ("resume-skips-one-batch-less", "train", "resume replays one batch fewer than the checkpoint consumed",
     "while skipped < step:", "while skipped < step - 1:"),
    ("resume-rng-not-restored", "train", "resume does not restore the RNG states",
     '_set_rng_state(ck["rng"])', "pass"),
    ("resume-window-not-restored", "train", "resume forgets the open metrics window",
     'self.n_steps_window = int(st["n_steps_window"])', "self.n_steps_window = 0"),
    ("checkpoint-step-off-by-one", "train", "checkpoint records step − 1",
     "_save_checkpoint(ckpt_path, runs, cfg, step, tokens)", "_save_checkpoint(ckpt_path, runs, cfg, step - 1, tokens)"),
    ("bos-kept-by-harvest", "activations", "harvest keeps position 0 (BOS) although exclude_bos",
     "start = 1 if exclude_bos else 0", "start = 0"),
    ("rows-start-with-eos", "data", "token rows start with EOS instead of BOS",
     "rows[:, 0] = bos", "rows[:, 0] = eos"),
    ("token-rows-ignore-seed", "data", "token_rows ignores its seed",
     "g = torch.Generator().manual_seed(seed)", "g = torch.Generator().manual_seed(0)"),
    ("welch-h", "afa", "Welch bound with h in place of h − 1",
     "return math.sqrt((h - d) / (d * (h - 1)))",
     "return math.sqrt((h - d) / (d * h))"),
]

_BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
             ast.Pow: ast.Mult, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.Mod: ast.FloorDiv}
_CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
             ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}


@dataclass
class Mutant:
    id: str
    scope: str
    function: str
    line: int
    description: str
    status: str = "pending"  # killed / survived / timeout / error
    seconds: float = 0.0
    detail: str = ""
    named: bool = False
    old: str = field(default="", repr=False)
    new: str = field(default="", repr=False)


# ------------------------------------------------------------------------------------- generation


def _functions(tree: ast.Module, names: list[str]) -> dict[str, ast.AST]:
    found: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names:
            found[node.name] = node
        if isinstance(node, ast.ClassDef):
            for sub in node.body:
                q = f"{node.name}.{sub.name}" if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
                if q in names:
                    found[q] = sub
    missing = sorted(set(names) - set(found))
    if missing:
        raise SystemExit(f"functions not found: {missing} (update SCOPES in {__file__})")
    return found


def _skip_ids(fn: ast.AST) -> set[int]:
    """Nodes whose mutants only change an error message, a docstring or a type annotation."""
    skip: set[int] = set()
    for node in ast.walk(fn):
        if isinstance(node, (ast.Raise, ast.Assert, ast.JoinedStr)):
            skip.update(id(n) for n in ast.walk(node))
        ann = [getattr(node, "annotation", None), getattr(node, "returns", None)]
        for a in ann:
            if isinstance(a, ast.AST):
                skip.update(id(n) for n in ast.walk(a))
    body = getattr(fn, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        skip.update(id(n) for n in ast.walk(body[0]))
    return skip


def _points(fn: ast.AST) -> list[tuple[ast.AST, str, object]]:
    """(node, kind, payload) for every mutation of ``fn``, in a deterministic order."""
    skip = _skip_ids(fn)
    out: list[tuple[ast.AST, str, object]] = []
    for node in ast.walk(fn):
        if id(node) in skip:
            continue
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _BIN_SWAP:
            out.append((node, "op", _BIN_SWAP[type(node.op)]))
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _CMP_SWAP:
                    out.append((node, "cmp", (i, _CMP_SWAP[type(op)])))
        elif isinstance(node, ast.BoolOp):
            out.append((node, "bool", ast.Or if isinstance(node.op, ast.And) else ast.And))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            out.append((node, "unary", None))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
            out.append((node, "const", None))
    return out


def _const_new(v):
    if isinstance(v, bool):
        return not v
    return v + 1


class _Replace(ast.NodeTransformer):
    def __init__(self, target: ast.AST, kind: str, payload: object):
        self.target, self.kind, self.payload = target, kind, payload
        self.before = self.after = ""

    def visit(self, node):
        if node is not self.target:
            return self.generic_visit(node)
        self.before = ast.unparse(node)
        if self.kind == "op":
            new = copy.copy(node)
            new.op = self.payload()
        elif self.kind == "cmp":
            i, op = self.payload
            new = copy.copy(node)
            new.ops = list(node.ops)
            new.ops[i] = op()
        elif self.kind == "bool":
            new = copy.copy(node)
            new.op = self.payload()
        elif self.kind == "unary":
            new = node.operand
        else:
            new = ast.Constant(_const_new(node.value))
        self.after = ast.unparse(new) if not isinstance(new, ast.AugAssign) else ast.unparse(new).strip()
        return ast.copy_location(new, node)


def generated_mutants(scope: str, sample: int = 0, seed: int = 0) -> tuple[list[Mutant], int]:
    """The scope's generated mutants (a seeded sample of ``sample`` when > 0) and their total count."""
    path, names, _ = SCOPES[scope]
    src = (ROOT / path).read_text()
    tree = ast.parse(src)
    fns = _functions(tree, names)
    points = [(qual, j) for qual in names for j in range(len(_points(fns[qual])))]
    if sample and len(points) > sample:
        import random

        keep = set(random.Random(f"{seed}:{scope}").sample(range(len(points)), sample))
        points = [p for i, p in enumerate(points) if i in keep]
    total = sum(len(_points(fns[q])) for q in names)
    out = []
    for qual, j in points:
        for node, kind, payload in [_points(fns[qual])[j]]:
            t2 = ast.parse(src)
            node2 = _points(_functions(t2, [qual])[qual])[j][0]
            rep = _Replace(node2, kind, _points(_functions(t2, [qual])[qual])[j][2])
            rep.visit(t2)
            ast.fix_missing_locations(t2)
            before, after = rep.before, rep.after
            if len(before) > 90:
                before, after = before[:87] + "...", after[:87] + "..."
            out.append(Mutant(id=f"{scope}:{qual}:{j}", scope=scope, function=qual, line=getattr(node, "lineno", 0),
                              description=f"`{before}` → `{after}`", new=ast.unparse(t2)))
    return out, total


def named_mutants(scope: str | None = None) -> list[Mutant]:
    out = []
    for mid, sc, desc, old, new in NAMED:
        if scope is not None and sc != scope:
            continue
        path = SCOPES[sc][0]
        src = (ROOT / path).read_text()
        n = src.count(old)
        if n != 1:
            raise SystemExit(f"named mutant {mid}: the text to replace occurs {n} times in {path} (needs 1)")
        line = src[: src.index(old)].count("\n") + 1
        out.append(Mutant(id=f"named:{mid}", scope=sc, function="(named)", line=line, description=desc, named=True,
                          new=src.replace(old, new)))
    return out


# ------------------------------------------------------------------------------------- running


def _prepare_copy() -> Path:
    work = Path(tempfile.mkdtemp(prefix="saelib-mutation-"))
    for sub in ("saelib", "tests", "notebooks", "profiles"):
        if (ROOT / sub).exists():
            shutil.copytree(ROOT / sub, work / sub, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for f in ("pyproject.toml", "myst.yml", "jupytext.toml"):
        if (ROOT / f).exists():
            shutil.copy2(ROOT / f, work / f)
    data = ROOT / "data"
    if data.exists():
        os.symlink(data, work / "data")
    return work


def _run_tests(work: Path, args: list[str], timeout: float) -> tuple[str, float, str]:
    """Fork; the child imports the (possibly mutated) saelib fresh and runs pytest."""
    t0 = time.perf_counter()
    out_file = work / "_last.txt"
    pid = os.fork()
    if pid == 0:  # child
        try:
            fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(work)
            sys.path.insert(0, str(work))
            for m in [m for m in sys.modules if m == "saelib" or m.startswith("saelib.")]:
                del sys.modules[m]
            import pytest

            rc = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "--no-header",
                              "-W", "ignore", *args])
            os._exit(int(rc))
        except BaseException:  # noqa: BLE001 - any import error kills the mutant
            import traceback

            traceback.print_exc()
            os._exit(99)
    deadline = t0 + timeout
    page = os.sysconf("SC_PAGE_SIZE")
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        try:  # a mutant that allocates without bound must not take the machine down
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            rss = 0
        if rss > MAX_RSS_BYTES:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "memory", time.perf_counter() - t0, f"memory > {MAX_RSS_BYTES / 2**30:.0f} GiB"
        if time.perf_counter() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.perf_counter() - t0, ""
        time.sleep(0.05)
    rc = os.waitstatus_to_exitcode(status)
    tail = ""
    try:
        lines = out_file.read_text(errors="replace").strip().splitlines()
        tail = next((ln for ln in reversed(lines) if ln.startswith(("FAILED", "ERROR"))), lines[-1] if lines else "")
    except OSError:
        pass
    return ("passed" if rc == 0 else "failed"), time.perf_counter() - t0, tail[:200]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated scopes (default: all)")
    ap.add_argument("--named-only", action="store_true", help="run only the named mutants")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--out", default=str(ROOT / "_build" / "mutation"), help="report folder")
    ap.add_argument("--timeout-factor", type=float, default=3.0, help="mutant time limit = factor x baseline + 10 s")
    ap.add_argument("--skip-baseline", action="store_true",
                    help="do not first run each scope's tests unmutated (then every mutant gets --timeout)")
    ap.add_argument("--timeout", type=float, default=300.0, help="mutant time limit with --skip-baseline (s)")
    ap.add_argument("--sample", type=int, default=0,
                    help="run a seeded random sample of this many generated mutants per scope (0 = all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample")
    ap.add_argument("--report-only", action="store_true", help="rewrite report.md from --out/results.json")
    ap.add_argument("--ids", default="", help="comma-separated mutant ids: run only these (e.g. a previous run's survivors)")
    a = ap.parse_args(argv)
    global BASELINE_CHECKED
    if a.report_only:
        doc = json.loads((Path(a.out) / "results.json").read_text())
        ms = [Mutant(**m) for m in doc["mutants"]]
        BASELINE_CHECKED = doc.get("baseline_checked", True)
        _write_report(Path(a.out), ms, doc["baseline_s"], doc["wall_s"], partial=doc["partial"],
                      population=doc.get("population", {}))
        print(Path(a.out) / "report.md")
        return 0
    scopes = [s for s in (a.only.split(",") if a.only else SCOPES) if s]
    for s in scopes:
        if s not in SCOPES:
            raise SystemExit(f"unknown scope {s!r}; choose from {sorted(SCOPES)}")
    mutants: list[Mutant] = []
    population: dict[str, int] = {}  # scope -> generated mutants before sampling
    per_scope: list[list[Mutant]] = []
    for s in scopes:
        mutants += named_mutants(s)
        if not a.named_only:
            gen, total = generated_mutants(s, a.sample, a.seed)
            if len(gen) < total:
                population[s] = total
            per_scope.append(gen)
    # named mutants first, then the generated ones round-robin over scopes (a partial run
    # still covers every scope)
    for i in range(max((len(g) for g in per_scope), default=0)):
        mutants += [g[i] for g in per_scope if i < len(g)]
    if a.ids:
        want = set(a.ids.split(","))
        mutants = [m for m in mutants if m.id in want]
        missing = want - {m.id for m in mutants}
        if missing:
            raise SystemExit(f"unknown mutant ids {sorted(missing)} (same --sample/--seed as the run that listed them?)")
    if a.list:
        for m in mutants:
            print(f"{m.id:45s} {SCOPES[m.scope][0]}:{m.line}  {m.description}")
        print(f"{len(mutants)} mutants")
        return 0

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("SAELIB_DATA_DIR", str(ROOT / "data"))
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    sys.dont_write_bytecode = True
    import numpy  # noqa: F401  (heavy imports once, in the parent: children inherit them)
    import pandas  # noqa: F401
    import pytest  # noqa: F401
    import torch

    torch.set_num_threads(1)
    work = _prepare_copy()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    baseline: dict[str, float] = {}
    try:
        for s in scopes:
            if a.skip_baseline:
                BASELINE_CHECKED = False
                baseline[s] = (a.timeout - 10) / a.timeout_factor
                continue
            status, secs, tail = _run_tests(work, SCOPES[s][2], timeout=1800)
            if status != "passed":
                raise SystemExit(f"scope {s}: the tests fail without any mutant ({tail}); fix them first")
            baseline[s] = secs
            print(f"baseline {s}: {secs:.1f} s", flush=True)
        for i, m in enumerate(mutants):
            path = work / SCOPES[m.scope][0]
            orig = path.read_text()
            path.write_text(m.new)
            try:
                status, secs, tail = _run_tests(work, SCOPES[m.scope][2],
                                                timeout=a.timeout_factor * baseline[m.scope] + 10)
            finally:
                path.write_text(orig)
            m.status = {"passed": "survived", "failed": "killed", "timeout": "killed", "memory": "killed"}[status]
            m.detail = "timeout" if status == "timeout" else tail
            m.seconds = secs
            print(f"[{i + 1}/{len(mutants)}] {m.status:8s} {secs:5.1f}s {m.id} {m.description}", flush=True)
            _write_report(out, mutants, baseline, time.perf_counter() - t_start, partial=True, population=population)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _write_report(out, mutants, baseline, time.perf_counter() - t_start, partial=False, population=population)
    print(f"report: {out / 'report.md'}")
    return 0


def _write_report(out: Path, mutants: list[Mutant], baseline: dict[str, float], wall: float, *, partial: bool,
                  population: dict[str, int]) -> None:
    done = [m for m in mutants if m.status != "pending"]
    rows = []
    for s in dict.fromkeys(m.scope for m in mutants):
        ms = [m for m in done if m.scope == s]
        k = sum(m.status == "killed" for m in ms)
        rows.append((s, SCOPES[s][0], len(ms), k, 100 * k / len(ms) if ms else float("nan")))
    killed = sum(m.status == "killed" for m in done)
    lines = [
        "# Mutation testing of the core" + (" (in progress)" if partial else ""),
        "",
        f"{len(done)} of {len(mutants)} mutants run in {wall / 60:.1f} min; "
        f"**{killed} killed ({100 * killed / max(len(done), 1):.1f}%)**, {len(done) - killed} survived.",
        "",
        "Generated by `scripts/mutation.py` (`make mutation`): one mutant at a time, the scope's tests with `-x`."
        + ("" if BASELINE_CHECKED else " This run skipped the unmutated baseline (`--skip-baseline`): every mutant had "
           "a fixed time limit, and the scopes' tests were checked to pass unmutated beforehand."),
        *([f"Generated mutants are a seeded sample per scope (of {sum(population.values())} in the sampled scopes: "
           + ", ".join(f"{k} {v}" for k, v in population.items()) + "); `make mutation MUTATION_ARGS=` runs all."]
          if population else []),
        "",
        "| scope | module | mutants | killed | kill rate |",
        "|---|---|---|---|---|",
        *[f"| {s} | `{p}` | {n} | {k} | {r:.1f}% |" for s, p, n, k, r in rows],
        "",
        "## Named mutants",
        "",
        "| mutant | scope | line | what | status | killing test |",
        "|---|---|---|---|---|---|",
        *[f"| {m.id[6:]} | {m.scope} | {m.line} | {m.description} | {m.status} | {m.detail.replace('|', '/')} |"
          for m in done if m.named],
        "",
        "## Surviving mutants",
        "",
        "Each with why it is harmless (equivalent, or display only) or which test kills it now "
        "(notes from `scripts/mutation_notes.json`).",
        "",
        "| mutant | module:line | change | note |",
        "|---|---|---|---|",
        *[f"| {m.id} | `{SCOPES[m.scope][0]}:{m.line}` | {m.description.replace('|', '/')} | "
          f"{NOTES.get(m.id, 'not yet analysed').replace('|', '/')} |"
          for m in done if m.status == "survived"],
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(
        {"baseline_s": baseline, "wall_s": wall, "partial": partial, "population": population,
         "baseline_checked": BASELINE_CHECKED,
         "mutants": [{k: v for k, v in asdict(m).items() if k not in ("old", "new")} for m in mutants]}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
