"""Scenario files: load, validate every key before anything runs, expand into resolved Cases.

A scenario is a YAML mapping:
    name: str (required)            description: str
    defaults: {field: value}        values for every case
    sweep: {field: [values]}        cases are the cartesian product, in the file's key order
    exclude: [{field: value|[values]}]   drop sweep cases matching every given field
    include: [{field: value|[values]}]   extra cases over the defaults; list values expand too

Every problem is reported as one line "FILE: KEY.PATH: problem; allowed: ..." and the loader
raises ScenarioError holding all of them (the CLI prints them and exits 2).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable

import yaml

import kernels
from suite.core import recompute_size
from suite.core.dtypes import DTYPES
from suite.core.recompute_size import RECOMPUTE

MODES = ("fwd", "fwd+bwd")
SCOPES = ("site", "layer", "model", "stability")
FAMILIES = ("dense", "deepseek")
OPS = ("site", "coeffs", "pre", "post", "chain")
CHAIN_SITES = 4                 # op chain: consecutive sites when `sites` is not given
MAX_CHAIN_SITES = 64
INITS = ("paper", "identity")           # scope stability: mHC's b (suite.workloads.stability)
DEVICES = ("cuda", "cpu")
MAX_N = 16
TOP_KEYS = ("name", "description", "defaults", "sweep", "exclude", "include")


class ScenarioError(Exception):
    """Bad input; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Case:
    method: str
    C: int
    T: int
    backend: str = "torch"
    n: int = 4
    dtype: str = "bf16"
    mode: str = "fwd"
    scope: str = "site"
    op: str = "site"
    device: str = "cuda"
    sinkhorn_iters: int | None = 20
    gpus: int = 1
    seed: int = 0
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    timeout_s: float = 1200.0
    traffic: bool = False           # also measure DRAM traffic in one pass under Nsight Compute
    # Whole-model fields (scope layer and model); None for scope site, so site ids do not change.
    layers: int | None = None
    heads: int | None = None
    mlp_ratio: int | None = None
    seq: int | None = None
    vocab: int | None = None
    recompute: str | None = None
    L_r: int | None = None              # consecutive *sites* per recompute block (Eq. 20)
    family: str | None = None           # dense | deepseek (suite.workloads.model, suite.workloads.deepseek)
    accum: int | None = None            # micro-batches of T tokens per optimizer step
    depth: int | None = None            # the full model's layers when `layers` runs fewer
    cuda_graph: bool | None = None      # scope model: the whole step replayed as a CUDA graph
    boundary_fusion: bool | None = None  # scope layer/model: adjacent sites' boundaries fused
    # Scope stability (a training run, suite.workloads.stability); None elsewhere, so ids stay.
    steps: int | None = None            # optimizer steps
    lr: float | None = None             # peak learning rate
    init: str | None = None             # paper | identity (mHC's b; HC has its paper's own)
    # Distributed fields (suite.workloads.dist.bench); None for single-process cases, so their ids stay.
    parallel: str | None = None         # p2p | pipeline | data
    microbatches: int | None = None     # pipeline: micro-batches per step
    overlap: str | None = None          # pipeline, data: none or techniques joined by '+'
    # op chain (kernels/chain.py): consecutive sites, F absent; None for every other op.
    sites: int | None = None

    # Fields that say how to measure, not what: they stay out of the id so runs join across them.
    RUN_CONTROL = ("seed", "warmup_ms", "rep_ms", "timeout_s", "traffic")
    MODEL_FIELDS = ("layers", "heads", "mlp_ratio", "seq", "vocab", "recompute", "L_r",
                    "family", "accum", "depth", "cuda_graph", "boundary_fusion", "steps", "lr",
                    "init")
    # Values that stay out of the id, so cases written before these fields existed keep theirs.
    ID_OMITTED = {"family": "dense", "accum": 1, "cuda_graph": False, "boundary_fusion": True}
    PARALLEL_FIELDS = ("parallel", "microbatches", "overlap")
    CHAIN_FIELDS = ("sites",)

    @property
    def case_id(self) -> str:
        what = {k: v for k, v in asdict(self).items() if k not in self.RUN_CONTROL
                and not (k in self.MODEL_FIELDS + self.PARALLEL_FIELDS + self.CHAIN_FIELDS
                         and v is None)
                and not (k in self.ID_OMITTED and v == self.ID_OMITTED[k])}
        if self.recompute in ("mhc", "full"):
            # L_r counted transformer layers in records written before it counted sites: the
            # unit is part of the id, so the two never join.
            what["L_r_unit"] = "site"
        blob = json.dumps(what, sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        n = "" if self.method == "residual" else f" n={self.n}"
        n += sinkhorn_label(self.sinkhorn_iters)
        op = "" if self.op == "site" else f" {self.op}"
        op += f" L={self.sites}" if self.op == "chain" else ""
        model = ""
        if self.scope != "site":
            rc = "" if self.recompute == "none" else f" recompute={self.recompute} L_r={self.L_r}"
            fam = "" if self.family in (None, "dense") else f" {self.family}"
            depth = f"/{self.depth}" if self.depth else ""
            acc = f" accum={self.accum}" if self.accum and self.accum > 1 else ""
            graph = " graph" if self.cuda_graph else ""
            graph += " unfused-boundaries" if self.boundary_fusion is False else ""
            train = ""
            if self.scope == "stability":
                init = f" init={self.init}" if self.init else ""
                train = f" steps={self.steps} lr={self.lr:g}{init}"
            model = (f"{fam} {self.scope} L={self.layers}{depth} seq={self.seq}{acc}{rc}{graph}"
                     f"{train}")
        return (f"{self.method}/{self.backend}{op}{n}{model} C={self.C} T={self.T} {self.dtype} "
                f"{self.mode} on {self.device}{parallel_label(self)}")


def sinkhorn_label(iters: int | None) -> str:
    """The Sinkhorn iterations in a label where they are not the paper's 20 (they change the case)."""
    return "" if iters in (None, 20) else f" iters={iters}"


CASE_FIELDS = tuple(f.name for f in fields(Case))
REQUIRED = ("method", "C", "T")


# ---------------------------------------------------------------- per-field rules
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_value(key: str, v: Any) -> str | None:
    """None if v is allowed for field `key`, else 'problem; allowed: ...'."""
    def choice(options):
        if isinstance(v, str) and v in options:
            return None
        return f"{v!r} is not allowed; allowed: {' | '.join(options)}"

    def int_range(lo, hi=None):
        if _is_int(v) and v >= lo and (hi is None or v <= hi):
            return None
        span = f"integers {lo}..{hi}" if hi is not None else f"integers >= {lo}"
        return f"{v!r} is not allowed; allowed: {span}"

    if key == "method":
        return choice(kernels.METHODS)
    if key == "backend":
        return choice(tuple(kernels.BACKENDS) + (kernels.AUTO,))
    if key == "family":
        return choice(FAMILIES)
    if key == "dtype":
        return choice(DTYPES)
    if key == "mode":
        return choice(MODES)
    if key == "scope":
        return choice(SCOPES)
    if key == "op":
        return choice(OPS)
    if key == "device":
        return choice(DEVICES)
    if key == "n":
        return int_range(1, MAX_N)
    if key in ("cuda_graph", "boundary_fusion"):
        return None if isinstance(v, bool) else f"{v!r} is not allowed; allowed: true | false"
    if key in ("layers", "heads", "mlp_ratio", "seq", "vocab", "L_r", "accum", "depth", "steps"):
        return int_range(1)
    if key == "init":
        return choice(INITS)
    if key == "lr":
        if (_is_int(v) or isinstance(v, float)) and v > 0 and math.isfinite(v):
            return None
        if isinstance(v, str) and _is_number(v):
            # YAML 1.1 reads an exponent without a dot (3e-3) as text
            return f"{v!r} is text to YAML; allowed: a positive number written with a dot (3.0e-3)"
        return f"{v!r} is not allowed; allowed: a positive number"
    if key == "recompute":
        return choice(RECOMPUTE)
    if key in ("C", "T", "gpus", "sinkhorn_iters"):
        return int_range(1)
    if key == "seed":
        return int_range(0)
    if key in ("warmup_ms", "rep_ms", "timeout_s"):
        if (_is_int(v) or isinstance(v, float)) and v > 0 and math.isfinite(v):
            return None
        unit = "seconds" if key == "timeout_s" else "milliseconds"
        return f"{v!r} is not allowed; allowed: a positive number of {unit}"
    if key == "traffic":
        return None if isinstance(v, bool) else f"{v!r} is not allowed; allowed: true | false"
    if key == "parallel":
        return choice(PARALLEL)
    if key == "microbatches":
        return int_range(1)
    if key == "sites":
        return int_range(2, MAX_CHAIN_SITES)
    if key == "overlap":
        return _check_overlap(v)
    return f"unknown field; allowed: {', '.join(CASE_FIELDS)}"


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _check_partial(path: str, mapping: Any, problems: list[str], lists_ok: bool) -> dict:
    """Validates a {field: value} mapping (values may be lists when lists_ok)."""
    if not isinstance(mapping, dict):
        problems.append(f"{path}: expected a mapping of case fields, got {type(mapping).__name__}")
        return {}
    good = {}
    for key, value in mapping.items():
        if key not in CASE_FIELDS:
            problems.append(f"{path}.{key}: unknown field; allowed: {', '.join(CASE_FIELDS)}")
            continue
        values = value if (lists_ok and isinstance(value, list)) else [value]
        if lists_ok and isinstance(value, list) and not value:
            problems.append(f"{path}.{key}: empty list; give at least one value")
            continue
        ok = True
        for i, item in enumerate(values):
            bad = _check_value(key, item)
            if bad:
                where = f"{path}.{key}[{i}]" if isinstance(value, list) else f"{path}.{key}"
                problems.append(f"{where}: {bad}")
                ok = False
        if ok:
            good[key] = value
    return good


# ---------------------------------------------------------------- loading
# Limits on what a scenario file may ask for, checked before anything is built: YAML aliases can
# make a few hundred bytes stand for millions of values, and a sweep's cases multiply.
MAX_FILE_BYTES = 1 << 20
MAX_NODES = 100_000          # values of the document with every alias expanded
MAX_DEPTH = 32               # nesting of mappings and lists
MAX_CASES = 100_000          # cases of one scenario, counted before the sweep is expanded


def _check_size(label: str, text: str) -> None:
    """ScenarioError when the document, its aliases expanded, is larger or deeper than allowed.
    Counted on YAML's event stream, before any node is built: each value and container counts
    once, an alias counts the size of what its anchor names, and the count stops at the limit, so
    a file of 500,000 values or an alias bomb is refused after 100,000 counted values."""
    total = 0
    open_at: list[tuple[str | None, int]] = []    # per open container: its anchor, total at start
    sizes: dict[str, int] = {}
    for event in yaml.parse(text, Loader=_FAST_LOADER):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            # depth counts containers only (the top-level mapping is 1), so an empty innermost
            # list is as deep as one holding a value
            if len(open_at) + 1 > MAX_DEPTH:
                raise ScenarioError([f"{label}: nested deeper than {MAX_DEPTH} levels"])
            open_at.append((event.anchor, total))
            total += 1
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchor, start = open_at.pop()
            if anchor is not None:
                sizes[anchor] = total - start
        elif isinstance(event, yaml.ScalarEvent):
            total += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            total += sizes.get(event.anchor, 1)
        if total > MAX_NODES:
            raise ScenarioError([f"{label}: more than {MAX_NODES} values once its aliases are "
                                 "expanded; a scenario file is small"])


# libyaml's parser where PyYAML was built with it: a file of 10^5 values parses in a fraction of
# a second instead of many seconds.
_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_FAST_LOADER):
    """Safe YAML that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


@dataclass
class Scenario:
    path: str
    name: str
    description: str
    cases: list[Case]
    warnings: tuple[str, ...] = ()      # one line each: legal, but likely not what was meant


def load(path: str | Path, overrides: dict | None = None) -> Scenario:
    """Reads, validates and expands a scenario file; raises ScenarioError listing every problem."""
    path = Path(path)
    label = str(path)
    try:
        # Read no more than the limit allows: a huge file is refused without being loaded.
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise ScenarioError([f"{label}: over {MAX_FILE_BYTES} bytes; a scenario file is at "
                                 f"most {MAX_FILE_BYTES} bytes"])
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ScenarioError([f"{label}: file not found"])
    except IsADirectoryError:
        raise ScenarioError([f"{label}: a folder; give a scenario YAML file"])
    except OSError as exc:
        raise ScenarioError([f"{label}: cannot read: {exc.strerror or exc}"])
    except UnicodeDecodeError as exc:
        raise ScenarioError([f"{label}: not UTF-8 text (byte {exc.start}); a scenario is a YAML file"])
    if not text.strip():
        raise ScenarioError([f"{label}: file is empty; a scenario needs at least `name` and cases"])
    try:
        _check_size(label, text)
        doc = yaml.load(text, Loader=_UniqueKeyLoader)
    except RecursionError:
        raise ScenarioError([f"{label}: nested deeper than {MAX_DEPTH} levels"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if "nesting depth" in problem:          # libyaml's own limit, far above ours
            raise ScenarioError([f"{label}: nested deeper than {MAX_DEPTH} levels"]) from None
        raise ScenarioError([f"{label}: not valid YAML{where}: {problem}"])
    if doc is None:
        raise ScenarioError([f"{label}: file has no content (only comments); a scenario needs "
                             "at least `name` and cases"])
    if not isinstance(doc, dict):
        raise ScenarioError([f"{label}: top level must be a mapping with keys "
                             f"{', '.join(TOP_KEYS)}; got {type(doc).__name__}"])
    return parse(doc, label, overrides)


def parse(doc: dict, label: str, overrides: dict | None = None) -> Scenario:
    problems: list[str] = []
    for key in doc:
        if key not in TOP_KEYS:
            problems.append(f"{label}: {key}: unknown key; allowed: {', '.join(TOP_KEYS)}")
    name = doc.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{label}: name: required, a non-empty string; got {name!r}")
    description = doc.get("description", "")
    if not isinstance(description, str):
        problems.append(f"{label}: description: must be a string; got {type(description).__name__}")

    defaults = _check_partial(f"{label}: defaults", doc.get("defaults") or {}, problems, False)
    sweep_doc = doc.get("sweep") or {}
    sweep = {}
    if not isinstance(sweep_doc, dict):
        problems.append(f"{label}: sweep: must be a mapping of field to a list of values")
    else:
        for key, value in sweep_doc.items():
            if not isinstance(value, list):
                problems.append(f"{label}: sweep.{key}: must be a list of values; got {value!r}")
        sweep = _check_partial(f"{label}: sweep",
                               {k: v for k, v in sweep_doc.items() if isinstance(v, list)},
                               problems, True)
    rules = {}
    for part in ("exclude", "include"):
        entries = doc.get(part) or []
        if not isinstance(entries, list):
            problems.append(f"{label}: {part}: must be a list of partial cases")
            entries = []
        rules[part] = [_check_partial(f"{label}: {part}[{i}]", e, problems, True)
                       for i, e in enumerate(entries)]
    overrides = _check_partial(f"{label}: --set", overrides or {}, problems, False)
    if problems:
        raise ScenarioError(problems)

    # (values, the keys the case's own sweep or include entry gives: a field that means nothing
    # for the case's scope is an error there, and dropped when it comes from defaults or --set)
    n_cases = (math.prod(len(v) if isinstance(v, list) else 1 for v in sweep.values())
               if sweep or not rules["include"] else 0)
    n_cases += sum(math.prod(len(v) if isinstance(v, list) else 1 for v in inc.values())
                   for inc in rules["include"])
    if n_cases > MAX_CASES:
        raise ScenarioError([f"{label}: the sweep and include lists make {n_cases} cases; a scenario "
                             f"has at most {MAX_CASES} (split it into several files)"])
    raw: list[tuple[dict, set]] = []
    used = [False] * len(rules["exclude"])
    # With no sweep, the defaults alone are one case, unless include lists the cases.
    if sweep or not rules["include"]:
        for combo in _product(sweep):
            hits = [i for i, ex in enumerate(rules["exclude"]) if _matches(combo, ex)]
            for i in hits:
                used[i] = True
            if not hits:
                raw.append(({**defaults, **combo}, set(combo)))
    for inc in rules["include"]:
        raw.extend(({**defaults, **combo}, set(combo)) for combo in _product(inc))
    warnings = tuple(f"{label}: exclude[{i}] ({_short(rules['exclude'][i])}) matches no case of "
                     "the sweep" for i, hit in enumerate(used) if not hit)

    cases, seen = [], set()
    for i, (values, own) in enumerate(raw):
        values = {**values, **overrides}
        scope = values.get("scope", "site")
        stray = sorted(k for k in own & set(Case.MODEL_FIELDS)
                       if values.get(k) is not None and scope not in field_scopes(k))
        if stray:
            allowed = [s for s in SCOPES if all(s in field_scopes(k) for k in stray)]
            problems.append(f"{label}: case {i + 1} ({_short(values)}): {', '.join(stray)}: "
                            f"means nothing for scope {scope}{SCOPE_WHAT.get(scope, '')}; "
                            f"allowed with scope {' or '.join(allowed)}")
            continue
        if "sites" in own and values.get("sites") is not None and values.get("op", "site") != "chain":
            problems.append(f"{label}: case {i + 1} ({_short(values)}): sites: means nothing for "
                            f"op {values.get('op', 'site')!r}; allowed with op chain")
            continue
        missing = [k for k in REQUIRED if k not in values]
        if missing:
            problems.append(f"{label}: case {i + 1} ({_short(values)}): missing {', '.join(missing)}; "
                            "set it in defaults, sweep or include")
            continue
        case = normalise(Case(**values))
        bad = model_problems(case) or parallel_problems(case)
        if bad:
            problems.append(f"{label}: case {i + 1} ({_short(values)}): {bad}")
            continue
        if case.method == "residual" and case.op == "coeffs":
            continue  # residual has no coefficients; dropped like a duplicate
        if case.case_id not in seen:
            seen.add(case.case_id)
            cases.append(case)
    if problems:
        raise ScenarioError(problems)
    if not cases:
        raise ScenarioError([f"{label}: no cases after expansion (check sweep, exclude and include)"])
    return Scenario(path=label, name=name, description=description.strip(), cases=cases,
                    warnings=warnings)


TRAINING_FIELDS = ("steps", "lr", "init")
SCOPE_WHAT = {"site": " (one connection site)", "stability": " (a training run)"}


def field_scopes(key: str) -> tuple[str, ...]:
    """The scopes a whole-model field means something for. Scope layer drops accum, depth and
    cuda_graph quietly (it always did); scope stability refuses them."""
    if key in TRAINING_FIELDS:
        return ("stability",)
    if key in ("accum", "depth", "cuda_graph"):
        return ("layer", "model")
    return ("layer", "model", "stability")


def normalise(case: Case) -> Case:
    """Fields that do not apply to a method are fixed, so equivalent cases share one id."""
    case = normalise_parallel(normalise_model(case))
    if case.op == "chain":
        case = replace(case, sites=case.sites or CHAIN_SITES)
    elif case.sites is not None:
        case = replace(case, sites=None)
    if case.method == "residual":
        return replace(case, n=1, sinkhorn_iters=None)
    if case.method == "hc":
        return replace(case, sinkhorn_iters=None)
    return case


# Defaults of the whole-model fields; they enter the id only for scopes layer, model and stability.
MODEL_DEFAULTS = {"mlp_ratio": 4, "vocab": 8192, "recompute": "none", "family": "dense",
                  "accum": 1, "cuda_graph": False, "boundary_fusion": True}
# Scope stability trains on bytes (suite.workloads.corpus): the vocabulary is theirs.
BYTE_VOCAB = 256
STABILITY_DEFAULTS = {"vocab": BYTE_VOCAB, "steps": 1000, "lr": 1e-3, "init": "paper"}
HEAD_DIM = 128


def normalise_model(case: Case) -> Case:
    if case.scope == "site":
        return replace(case, **{k: None for k in Case.MODEL_FIELDS})
    defaults = MODEL_DEFAULTS
    if case.scope == "stability":
        defaults = {**MODEL_DEFAULTS, **STABILITY_DEFAULTS}
    fill = {k: v for k, v in defaults.items() if getattr(case, k) is None}
    case = replace(case, **fill)
    if case.scope != "stability":
        case = replace(case, **{k: None for k in TRAINING_FIELDS})
    elif case.method != "mhc":
        # HC's paper init already starts h_res at I, and residual has no h_res: one case each
        case = replace(case, init="paper" if case.method == "hc" else None)
    if case.family == "deepseek":
        case = replace(case, mlp_ratio=None)      # MLA and MoE sublayers have no MLP ratio
    if case.depth is not None and case.depth == case.layers:
        case = replace(case, depth=None)
    if case.scope != "model":
        case = replace(case, accum=1, cuda_graph=False, depth=None)
    if case.scope == "layer":
        case = replace(case, layers=1, vocab=None)      # one layer: no embedding or head
    elif case.layers is None:
        case = replace(case, layers=2)
    if case.heads is None:
        case = replace(case, heads=max(1, case.C // HEAD_DIM))
    if case.seq is None:
        case = replace(case, seq=min(case.T, 4096))
    if case.method == "residual" and case.recompute == "mhc":
        case = replace(case, recompute="none")   # nothing of the connection to recompute
    if case.recompute == "none":
        case = replace(case, L_r=None)
    elif case.L_r is None:
        # Eq. 20's integer optimum, counted in sites of the full depth
        case = replace(case, L_r=min(2 * case.layers,
                                     recompute_size.default_lr(case.n, case.depth or case.layers)))
    return case


def model_problems(case: Case) -> str | None:
    """Cross-field rules of scopes layer, model and stability: one line, or None."""
    if case.scope == "site":
        return None
    if case.op != "site":
        return f"op: {case.op!r} is not allowed with scope {case.scope}; allowed: site"
    if case.scope == "model" and case.mode != "fwd+bwd":
        return f"mode: {case.mode!r} is not allowed with scope model (a training step); allowed: fwd+bwd"
    if case.T % case.seq:
        return f"T: {case.T} is not a multiple of seq {case.seq}; allowed: T = batch * seq"
    if case.C % case.heads:
        return f"heads: {case.heads} does not divide C {case.C}; allowed: divisors of C"
    sites = 2 * case.layers
    if case.L_r is not None and case.L_r > sites:
        return (f"L_r: {case.L_r} is more than the {sites} sites of {case.layers} layers (L_r "
                f"counts sites, two per layer); allowed: integers 1..{sites}")
    if case.depth is not None and case.depth < case.layers:
        return f"depth: {case.depth} is less than layers {case.layers}; allowed: >= layers"
    if case.backend == kernels.AUTO and case.scope == "site":
        return "backend: 'auto' picks per op inside a model; allowed with scope layer or model"
    if case.family == "deepseek" and case.scope == "model" and case.depth and case.layers < 2:
        return "layers: a partial deepseek model needs at least 2 layers (the dense one and an MoE one)"
    if case.scope == "stability":
        return stability_problems(case)
    return None


def stability_problems(case: Case) -> str | None:
    """Cross-field rules of scope stability (a training run): one line, or None."""
    if case.mode != "fwd+bwd":
        return (f"mode: {case.mode!r} is not allowed with scope stability (a training run); "
                "allowed: fwd+bwd")
    if case.vocab != BYTE_VOCAB:
        return (f"vocab: {case.vocab} is not allowed with scope stability (byte-level tokens); "
                f"allowed: {BYTE_VOCAB}")
    if case.backend == kernels.AUTO:
        return ("backend: 'auto' chooses by timing; a stability case names its backend; "
                f"allowed: {' | '.join(kernels.BACKENDS)}")
    return None


def _product(spec: dict) -> Iterable[dict]:
    keys = list(spec)
    lists = [v if isinstance(v, list) else [v] for v in spec.values()]
    for combo in itertools.product(*lists):
        yield dict(zip(keys, combo))


def _matches(case: dict, rule: dict) -> bool:
    for key, want in rule.items():
        options = want if isinstance(want, list) else [want]
        if case.get(key) not in options:
            return False
    return True


def _short(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def parse_overrides(items: list[str]) -> dict:
    """`--set key=value` pairs, values parsed as YAML scalars (so C=4096 is an int)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ScenarioError([f"--set {item}: expected KEY=VALUE; keys: {', '.join(CASE_FIELDS)}"])
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def filter_cases(scenario: Scenario, only: list[str]) -> Scenario:
    """Keeps the cases matching every `KEY=V1[,V2]` filter (values compared as written)."""
    rules = []
    for item in only or []:
        key, sep, values = item.partition("=")
        if not sep or key not in CASE_FIELDS:
            raise ScenarioError([f"--only {item}: expected KEY=V1[,V2] with KEY one of "
                                 f"{', '.join(CASE_FIELDS)}"])
        rules.append((key, {v.strip() for v in values.split(",")}))
    cases = [c for c in scenario.cases if all(_value_in(getattr(c, k), vals) for k, vals in rules)]
    if not cases:
        raise ScenarioError([f"{scenario.path}: no case matches --only {' '.join(only)}"])
    return replace(scenario, cases=cases)


def _value_in(value, options: set[str]) -> bool:
    """Matches a case value against --only strings; numbers by value (25 matches 25.0)."""
    for option in options:
        if str(value) == option:
            return True
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and float(option) == value:
                return True
        except ValueError:
            pass
    return False


# ---------------------------------------------------------------- distributed cases
PARALLEL = ("p2p", "pipeline", "data")
OVERLAP_TECHNIQUES = ("stream", "priority", "early_recompute")
OVERLAP_HELP = ("none, or any of stream, priority, early_recompute joined by '+' "
                "(e.g. stream+priority)")


def _check_overlap(v) -> str | None:
    if not isinstance(v, str) or not v:
        return f"{v!r} is not allowed; allowed: {OVERLAP_HELP}"
    if v == "none":
        return None
    parts = v.split("+")
    bad = [p for p in parts if p not in OVERLAP_TECHNIQUES]
    if bad or len(set(parts)) != len(parts):
        return f"{v!r} is not allowed; allowed: {OVERLAP_HELP}"
    return None


def normalise_parallel(case: Case) -> Case:
    """Fills the distributed fields' defaults and writes `overlap` in one order, so equal
    cases share one id. Residual has no connection to recompute, so early_recompute goes."""
    if case.parallel is None:
        return case                     # parallel_problems refuses stray fields
    if case.parallel == "p2p":
        return replace(case, microbatches=None, overlap=None)
    parts = set() if case.overlap in (None, "none") else set(case.overlap.split("+"))
    if case.recompute in (None, "none"):
        parts.discard("early_recompute")
    overlap = "+".join(t for t in OVERLAP_TECHNIQUES if t in parts) or "none"
    if case.parallel == "data":
        return replace(case, microbatches=None, overlap=overlap)
    return replace(case, microbatches=case.microbatches or 4, overlap=overlap)


def parallel_problems(case: Case) -> str | None:
    """Cross-field rules of the distributed cases: one line, or None."""
    if case.parallel is None:
        if case.microbatches is not None or case.overlap is not None:
            return "microbatches and overlap need parallel: pipeline or data"
        return None
    if case.parallel == "p2p":
        if case.scope != "site" or case.op != "site":
            return f"scope: {case.scope!r} is not allowed with parallel p2p; allowed: site"
        if case.gpus > 1 and case.gpus % 2:
            return (f"gpus: {case.gpus} is not allowed with parallel p2p (ranks send in pairs); "
                    "allowed: 1 (the single-GPU stand-in) or an even number")
        return None
    if case.scope != "model":
        return (f"scope: {case.scope!r} is not allowed with parallel {case.parallel}; "
                "allowed: model")
    if case.parallel == "pipeline":
        if case.gpus > case.layers:
            return (f"gpus: {case.gpus} stages need at least as many layers; layers is "
                    f"{case.layers}")
        if case.T % (case.microbatches * case.seq):
            return (f"T: {case.T} is not a multiple of microbatches * seq = "
                    f"{case.microbatches * case.seq}; allowed: T = microbatches * batch * seq")
    if case.parallel == "data":
        extra = set(case.overlap.split("+")) - {"priority", "none"}
        if extra:
            return (f"overlap: {case.overlap!r} is not allowed with parallel data (DDP overlaps "
                    "its all-reduce itself); allowed: none | priority")
    return None


def parallel_label(case: Case) -> str:
    if case.parallel is None:
        return ""
    if case.parallel == "p2p":
        where = "stand-in: host-device copies" if case.gpus == 1 else f"gpus={case.gpus}"
        return f" [p2p {where}]"
    where = ("stand-in: host-device copies" if case.gpus == 1 and case.parallel == "pipeline"
             else f"gpus={case.gpus}")
    mb = f" mb={case.microbatches}" if case.microbatches else ""
    return f" [{case.parallel} {where}{mb} overlap={case.overlap}]"


def load_all(paths: list[str], sets: list[str], only: list[str] = ()) -> list[Scenario]:
    """The scenario files of a command line with its --set and --only applied; ScenarioError
    with every problem of every file, before anything runs."""
    overrides = parse_overrides(sets)
    scenarios, problems = [], []
    for path in paths:
        try:
            scenarios.append(filter_cases(load(path, overrides), only))
        except ScenarioError as exc:
            problems += exc.problems
    if problems:
        raise ScenarioError(problems)
    return scenarios
