"""`sail-soup DIR... --out DIR`: average homogeneous checkpoints (model soup, SAIL-VL2 report Table 5).

Inputs are HF exports in the SAIL-VL2 layout (`config.json` + safetensors shards, as `sail_dist.model.hf.save_sailvl`
writes them) or run directories (their `<run>/hf`). The soup is the element-wise weighted mean of every tensor,
computed in fp32 and cast back to the inputs' dtype, written in the layout of the first input (same shard files and
index, `config.json` copied) plus `soup.json` (inputs, weights, lineage, distances), so `train.init_from=<out>` loads it.

Averaging only helps checkpoints of one lineage (same architecture and starting point; in the report, homogeneous
soups gain +1.7 points on average while a heterogeneous soup collapses to 12.9), so the tool refuses, naming the reason:
  * config.json keys that differ;                              (--force: warn and use the first input's config)
  * tensor names or shapes that differ;                        (never: there is no element-wise mean)
  * dtypes that differ;                                        (--force: cast to the first input's dtype)
  * lineage: runs whose `train.init_from` (from <run>/config.yaml; `random init, seed S` without one) differ; a
    bare HF directory has a lineage only through a `soup.json` beside it, otherwise a warning says it cannot be
    checked;                                                    (--force: warn)
  * relative distance ||x_i - x_0|| / ||x_0|| over all tensors above --max-distance (default 0.3).  (--force: warn)
    Why 0.3: two independent random inits of equal scale sit at about sqrt(2) = 1.41 when random matrices carry
    the norm (real sizes), and still at 0.58 for the tiny test model, whose identical RMSNorm weights (ones) carry
    much of its small norm; fine-tunes of one checkpoint stay within a few per cent of it (tiny model: 0.0045
    after 2 steps at lr 2e-3 from its parent). 0.3 sits in that gap: it catches unrelated weights without
    second-guessing the lineage check. The message names the furthest tensor too.

Memory: tensor by tensor, each read with plain file reads at its offset from the safetensors header, in chunks,
into one fp32 buffer, and accumulated into a second: the peak is about two fp32 copies of the largest tensor,
whatever the number of inputs (tests/test_soup.py measures it: 3 inputs of 24 MiB, largest tensor 16 MiB in fp32).
(Reading through `safe_open` instead keeps every touched page of the memory map resident: measured, the peak then
grows by the tensor's size with every input.) Each input is read twice (distance, then mean). The output is
written tensor by tensor to `<out>.tmp` and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
from dataclasses import dataclass, field

import torch

from sail_dist.config import flatten_dict
from sail_dist.model.hf import resolve_hf_dir

DEFAULT_MAX_DISTANCE = 0.3
_CHUNK = 1 << 18  # elements per read and per float64 norm chunk (the transient on top of the two fp32 buffers)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_INDEX = "model.safetensors.index.json"


class SoupError(ValueError):
    """The checkpoints cannot (or, without --force, should not) be averaged; the message says why."""


@dataclass
class SoupInput:
    given: str  # the path on the command line
    hf_dir: str
    run_dir: str | None
    config: dict
    tensors: dict[str, tuple[str, str, tuple[int, ...], int]]  # name -> (shard file, dtype, shape, byte offset)
    lineage: str | None  # None: unknown
    lineage_from: str  # where the lineage was read


def _read_header(path: str) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SoupError(f"{path}: not a safetensors file (shorter than its header length)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise SoupError(f"{path}: not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def _tensor_index(hf_dir: str) -> dict[str, tuple[str, str, tuple[int, ...], int]]:
    index = os.path.join(hf_dir, _INDEX)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    if not files:
        raise SoupError(f"{hf_dir}: no *.safetensors files (an HF export holds config.json + safetensors shards)")
    out = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.exists(path):
            raise SoupError(f"{hf_dir}: the index names a shard that is missing: {name}")
        header, data = _read_header(path)
        for k, v in header.items():
            out[k] = (name, v["dtype"], tuple(v["shape"]), data + v["data_offsets"][0])
    return out


def _run_lineage(run_dir: str) -> tuple[str | None, str]:
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return None, f"{path} (missing)"
    with open(path) as f:
        train = (yaml.safe_load(f) or {}).get("train", {})
    init = train.get("init_from") or ""
    if not init:
        return f"random init, train.seed={train.get('seed')}", path
    real = os.path.realpath(init)
    lineage = f"init_from {real}"
    cfg_json = os.path.join(real, "config.json")
    if os.path.exists(cfg_json):  # an LLM-only or ViT-only start leaves the other parts to the seed
        with open(cfg_json) as f:
            if json.load(f).get("model_type") != "sailvl":
                lineage += f", train.seed={train.get('seed')}"
    return lineage, path


def resolve_input(path: str) -> SoupInput:
    """An HF export directory, or a run directory (its hf/ export): model/hf.py resolve_hf_dir's rule."""
    try:
        hf_dir = resolve_hf_dir(path, what="sail-soup input")
    except FileNotFoundError as e:
        raise SoupError(f"{e}; a run writes hf/ at its end with train.export_hf=true") from None
    run_dir = None
    for cand in (path, os.path.dirname(os.path.abspath(hf_dir))):  # <run>/ given, or <run>/hf given directly
        if os.path.exists(os.path.join(cand, "config.yaml")) and os.path.abspath(hf_dir) == os.path.join(
                os.path.abspath(cand), "hf"):
            run_dir = cand
            break
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    if run_dir is not None:
        lineage, where = _run_lineage(run_dir)
    elif os.path.exists(os.path.join(hf_dir, "soup.json")):
        with open(os.path.join(hf_dir, "soup.json")) as f:
            lineage, where = json.load(f).get("lineage"), os.path.join(hf_dir, "soup.json")
    else:
        lineage, where = None, "no provenance (bare HF directory)"
    return SoupInput(path, hf_dir, run_dir, config, _tensor_index(hf_dir), lineage, where)


@dataclass
class Check:
    fatal: list[str] = field(default_factory=list)  # no --force can fix these
    refusals: list[str] = field(default_factory=list)  # --force turns these into warnings
    warnings: list[str] = field(default_factory=list)


def check_inputs(inputs: list[SoupInput]) -> Check:
    """Config, tensor names, shapes, dtypes and lineage of every input against the first."""
    c = Check()
    ref = inputs[0]
    flat0 = flatten_dict(ref.config)
    for inp in inputs[1:]:
        flat = flatten_dict(inp.config)
        diff = sorted(k for k in set(flat0) | set(flat) if flat0.get(k, "<absent>") != flat.get(k, "<absent>"))
        if diff:
            shown = ", ".join(f"{k}: {flat0.get(k, '<absent>')!r} vs {flat.get(k, '<absent>')!r}" for k in diff[:10])
            c.refusals.append(f"different config: {inp.given} differs from {ref.given} in {len(diff)} key(s): {shown}"
                              f"{' ...' if len(diff) > 10 else ''}")
        missing = sorted(set(ref.tensors) - set(inp.tensors))
        extra = sorted(set(inp.tensors) - set(ref.tensors))
        if missing or extra:
            c.fatal.append(f"different tensor names: {inp.given} lacks {len(missing)} of {ref.given}'s tensors "
                           f"{missing[:5]}{' ...' if len(missing) > 5 else ''} and has {len(extra)} extra "
                           f"{extra[:5]}{' ...' if len(extra) > 5 else ''}")
        common = sorted(set(ref.tensors) & set(inp.tensors))
        shapes = [k for k in common if ref.tensors[k][2] != inp.tensors[k][2]]
        if shapes:
            c.fatal.append(f"different tensor shapes: {inp.given} vs {ref.given}: " + ", ".join(
                f"{k} {list(inp.tensors[k][2])} vs {list(ref.tensors[k][2])}" for k in shapes[:5])
                + (" ..." if len(shapes) > 5 else ""))
        dtypes = [k for k in common if ref.tensors[k][1] != inp.tensors[k][1]]
        if dtypes:
            c.refusals.append(f"dtype mismatch: {inp.given} vs {ref.given}: " + ", ".join(
                f"{k} {inp.tensors[k][1]} vs {ref.tensors[k][1]}" for k in dtypes[:5])
                + (" ..." if len(dtypes) > 5 else "") + " (--force casts to the first input's dtype)")
        odd = [k for k in common if ref.tensors[k][1] not in _DTYPES]
        if odd:
            c.fatal.append(f"unsupported dtype {ref.tensors[odd[0]][1]} of {odd[0]}")
    unknown = [i.given for i in inputs if i.lineage is None]
    known = {i.lineage for i in inputs if i.lineage is not None}
    if len(known) > 1:
        c.refusals.append("different lineage: " + "; ".join(f"{i.given}: {i.lineage} (from {i.lineage_from})"
                                                             for i in inputs if i.lineage is not None)
                          + ". Soups of checkpoints that did not start from the same weights collapse (report "
                          "Table 5)")
    if unknown:
        c.warnings.append(f"lineage cannot be checked for {', '.join(unknown)}: no run config.yaml or soup.json "
                          "(pass run directories to check train.init_from)")
    return c


def _read_into(buf: torch.Tensor, inp: SoupInput, name: str) -> None:
    """buf (the tensor's shape, any dtype) <- the input's tensor, read (not mapped) in chunks of _CHUNK elements."""
    fname, dtype, _, offset = inp.tensors[name]
    src = _DTYPES[dtype]
    size = torch.empty((), dtype=src).element_size()
    flat = buf.view(-1)
    chunk = bytearray(min(flat.numel(), _CHUNK) * size)
    with open(os.path.join(inp.hf_dir, fname), "rb") as f:
        f.seek(offset)
        for a in range(0, flat.numel(), _CHUNK):
            n = min(_CHUNK, flat.numel() - a)
            view = memoryview(chunk)[:n * size]
            if f.readinto(view) != n * size:
                raise SoupError(f"{inp.hf_dir}/{fname}: {name} is truncated")
            flat[a:a + n].copy_(torch.frombuffer(chunk, dtype=src, count=n))


def _sq_norm(x: torch.Tensor) -> float:
    """||x||^2 accumulated in float64 chunk by chunk (a whole-tensor float64 cast would be a third, double-size copy)."""
    return sum(float(torch.linalg.vector_norm(c, dtype=torch.float64)) ** 2 for c in x.reshape(-1).split(_CHUNK))


def _write_safetensors(path: str, names: list[str], meta: dict[str, tuple[str, tuple[int, ...]]], produce) -> None:
    """Write one safetensors file tensor by tensor (header first from the known dtypes and shapes, then each
    tensor's bytes as `produce(name)` returns it), so no shard is ever held in memory whole."""
    header, offset = {}, 0
    for n in names:
        dtype, shape = meta[n]
        nbytes = math.prod(shape) * torch.empty((), dtype=_DTYPES[dtype]).element_size()
        header[n] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for n in names:
            t = produce(n)
            if t.dtype != _DTYPES[meta[n][0]] or tuple(t.shape) != meta[n][1]:
                raise RuntimeError(f"soup: tensor {n} came out {t.dtype} {tuple(t.shape)}, not the header's "
                                   f"{meta[n][0]} {meta[n][1]} (a bug: please report it)")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def make_soup(paths: list[str], out: str, weights: list[float] | None = None, force: bool = False,
              max_distance: float = DEFAULT_MAX_DISTANCE, warn=lambda msg: None) -> dict:
    """Average the checkpoints at `paths` into `out`; returns the provenance written to `out`/soup.json.
    Raises SoupError naming every reason it refuses (or, with force, reports them through `warn`)."""
    if len(paths) < 2:
        raise SoupError("a soup needs at least two checkpoints")
    if os.path.exists(out):
        raise SoupError(f"--out {out} exists: remove it or choose another directory")
    weights = [1.0] * len(paths) if weights is None else list(weights)
    if len(weights) != len(paths):
        raise SoupError(f"--weights has {len(weights)} values for {len(paths)} checkpoints")
    if not all(w > 0 and math.isfinite(w) for w in weights):
        raise SoupError(f"--weights must be positive numbers, got {weights}")
    total = sum(weights)
    weights = [w / total for w in weights]  # the mean's weights sum to 1
    inputs = [resolve_input(p) for p in paths]
    check = check_inputs(inputs)
    if check.fatal:
        raise SoupError("cannot average these checkpoints: " + "; ".join(check.fatal + check.refusals))
    if check.refusals and not force:
        raise SoupError("refusing to average: " + "; ".join(check.refusals) + ". Pass --force to average anyway.")
    for msg in check.warnings + [f"--force: {r}" for r in check.refusals]:
        warn(msg)

    ref = inputs[0]
    tmp = out.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    sq_diff = [0.0] * len(inputs)
    sq_ref = 0.0
    worst: list[tuple[float, str]] = [(0.0, "")] * len(inputs)  # per input: the tensor furthest from input 0

    def produce(name: str) -> torch.Tensor:
        nonlocal sq_ref
        _, dtype, shape, _ = ref.tensors[name]
        out_dtype = _DTYPES[dtype]
        if not out_dtype.is_floating_point:  # integer / bool buffers are copied and must agree
            t0, t = torch.empty(shape, dtype=out_dtype), torch.empty(shape, dtype=out_dtype)
            _read_into(t0, ref, name)
            for inp in inputs[1:]:
                _read_into(t, inp, name)
                if not torch.equal(t, t0):
                    raise SoupError(f"{name} ({dtype}) differs between {ref.given} and {inp.given}: "
                                    "non-float tensors cannot be averaged")
            return t0
        acc = torch.empty(shape, dtype=torch.float32)
        _read_into(acc, ref, name)  # acc = x_0
        n0 = _sq_norm(acc)
        sq_ref += n0
        buf = torch.empty_like(acc)
        for i, inp in enumerate(inputs[1:], 1):  # distances to x_0 first (x_0 is still whole in acc)
            _read_into(buf, inp, name)
            d = _sq_norm(buf.sub_(acc))
            sq_diff[i] += d
            rel = math.sqrt(d / n0) if n0 > 0 else (0.0 if d == 0 else math.inf)
            if rel > worst[i][0]:
                worst[i] = (rel, name)
        acc.mul_(weights[0])
        for i, inp in enumerate(inputs[1:], 1):
            _read_into(buf, inp, name)
            acc.add_(buf, alpha=weights[i])
        del buf
        return acc.to(out_dtype)

    by_file: dict[str, list[str]] = {}
    for name, (fname, _, _, _) in ref.tensors.items():
        by_file.setdefault(fname, []).append(name)
    meta = {n: (d, s) for n, (_, d, s, _) in ref.tensors.items()}
    for fname, names in sorted(by_file.items()):
        _write_safetensors(os.path.join(tmp, fname), sorted(names), meta, produce)

    distances = [math.sqrt(d / sq_ref) if sq_ref > 0 else 0.0 for d in sq_diff]
    far = [(inp.given, dist, worst[i]) for i, (inp, dist) in enumerate(zip(inputs, distances))
           if i > 0 and dist > max_distance]
    if far:
        msg = (f"relative distance ||x_i - x_0|| / ||x_0|| above --max-distance={max_distance} (x_0 = {ref.given}): "
               + "; ".join(f"{g}: {d:.4f} (furthest tensor {w[1]}: {w[0]:.4f})" for g, d, w in far)
               + ". Unrelated weights sit near sqrt(2) = 1.41")
        if not force:
            shutil.rmtree(tmp)
            raise SoupError("refusing to average: " + msg + ". Pass --force to average anyway, or raise "
                            "--max-distance.")
        warn("--force: " + msg)
        check.refusals.append(msg)

    for name in os.listdir(ref.hf_dir):  # config.json, index, tokenizer files...: as in the first input
        src = os.path.join(ref.hf_dir, name)
        if os.path.isfile(src) and not name.endswith(".safetensors") and name != "soup.json":
            shutil.copyfile(src, os.path.join(tmp, name))
    lineages = {i.lineage for i in inputs}
    provenance = {
        "created_by": "sail-soup", "weights": weights, "max_distance": max_distance, "forced": check.refusals if force
        else [], "warnings": check.warnings,
        "lineage": next(iter(lineages)) if len(lineages) == 1 else None,
        "inputs": [{"path": os.path.abspath(i.given), "hf_dir": os.path.abspath(i.hf_dir), "lineage": i.lineage,
                    "lineage_from": i.lineage_from, "weight": w, "distance_to_first": d}
                   for i, w, d in zip(inputs, weights, distances)]}
    with open(os.path.join(tmp, "soup.json"), "w") as f:
        json.dump(provenance, f, indent=2)
    os.replace(tmp, out)
    return provenance


def main(argv: list[str] | None = None) -> int:
    """`sail-soup DIR... --out DIR [--weights w1,w2,...] [--force] [--max-distance X]`."""
    ap = argparse.ArgumentParser(prog="sail-soup", description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="HF exports (SAIL-VL2 layout) or run directories (their hf/)")
    ap.add_argument("--out", required=True, help="directory for the averaged HF export (must not exist)")
    ap.add_argument("--weights", default="", help="comma-separated weights, one per input (normalised to sum 1); "
                    "default: the plain mean")
    ap.add_argument("--force", action="store_true", help="average despite config, dtype, lineage or distance "
                    "refusals (each becomes a warning); names and shapes must still match")
    ap.add_argument("--max-distance", type=float, default=DEFAULT_MAX_DISTANCE,
                    help=f"refuse inputs further than this from the first (||x_i - x_0|| / ||x_0||; default "
                         f"{DEFAULT_MAX_DISTANCE})")
    args = ap.parse_args(argv)
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError:
        print(f"sail-soup: --weights {args.weights!r} is not a comma-separated list of numbers", file=sys.stderr)
        return 2
    try:
        prov = make_soup(args.inputs, args.out, weights, args.force, args.max_distance,
                         warn=lambda m: print(f"sail-soup: warning: {m}", file=sys.stderr))
    except SoupError as e:
        print(f"sail-soup: {e}", file=sys.stderr)
        return 2
    for i in prov["inputs"]:
        print(f"{i['path']}: weight {i['weight']:.4f}, distance to the first {i['distance_to_first']:.4f}, "
              f"lineage {i['lineage'] or 'unknown'}")
    print(f"soup written: {args.out} (train.init_from={args.out})")
    print(json.dumps({"out": args.out, "inputs": len(prov["inputs"]), "weights": prov["weights"],
                      "distances": [i["distance_to_first"] for i in prov["inputs"]], "forced": prov["forced"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
