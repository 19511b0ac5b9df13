"""Structured pruning of FFN channels and attention heads, on the torch module before export.

    from autotune.frontend.prune import prune
    pruned, info = prune(module, "ffn=0.5,heads=0.75")          # an nn.Module -> a pruned copy
    source2, info = prune(source, "ffn=0.5")                      # a ModelSource -> re-imported

The spec gives the *kept* fraction of each kind of unit: `ffn=F` keeps F of every feed-forward
block's hidden channels, `heads=H` keeps H of every attention layer's heads (at least one of
each). Which units are kept is decided per layer by an importance score:

    score="magnitude" (default, data-free)
        FFN channel j:  ||W_up[j, :], b_up[j]|| * ||W_down[:, j]||   (gated FFNs: both up rows)
        head h:         ||W_v[h rows]|| (+ ||W_add_v[h rows]|| for I2V image keys) * ||W_out[:, h cols]||
    score="activation" (needs `calibration_inputs`, the module's positional inputs)
        the same with the weights on the input side replaced by the mean |activation| that
        reaches W_down / W_out on the calibration batch (how much each unit actually writes).

Why torch and not a Relax pass: in the imported Relax module the head count and FFN width
appear as constants inside reshapes (`R.reshape(x, [1, 48, 2, 16])`), the RMS norm across heads
is decomposed into mean/rsqrt over the flattened axis, and every downstream shape is static.
Pruning there means pattern-matching the decomposed attention and rewriting each reshape
constant; on the torch module it is slicing `nn.Linear` weights and setting `attn.heads`, and
`torch.export` re-derives every shape. So pruning happens before import: the CLI prunes the
torch module of the model source and then imports it (see `prune` for ModelSource).

Supported modules: diffusers `FeedForward` (net[0].proj up-projection, plain or gated GEGLU /
SwiGLU, net[-1] or net[2] down-projection) and attention modules with `to_q/to_k/to_v/to_out[0]`
and `heads` (diffusers `WanAttention`, incl. I2V `add_k_proj/add_v_proj` and the
`rms_norm_across_heads` norms, whose weights are sliced: note their RMS statistic is then taken
over the kept heads only, part of the approximation pruning makes).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from autotune.support.errors import InputError

KINDS = ("ffn", "heads")


@dataclass(frozen=True)
class PruneSpec:
    ffn: float = 1.0
    heads: float = 1.0

    def __str__(self) -> str:
        return ",".join(f"{k}={getattr(self, k):g}" for k in KINDS if getattr(self, k) < 1.0) or "none"


def parse_spec(spec: str | dict | PruneSpec) -> PruneSpec:
    """'ffn=0.5,heads=0.75' (kept fractions in (0, 1]) -> PruneSpec; a dict works too."""
    if isinstance(spec, PruneSpec):
        return spec
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec).replace(" ", "").split(","):
            if not part:
                continue
            if "=" not in part:
                raise InputError(f"--prune {spec!r}: '{part}' is not KIND=FRACTION; e.g. ffn=0.5,heads=0.75")
            key, value = part.split("=", 1)
            items.append((key, value))
    values = {}
    for key, value in items:
        if key not in KINDS:
            raise InputError(f"--prune {spec!r}: unknown kind '{key}'; known kinds: {', '.join(KINDS)}")
        try:
            frac = float(value)
        except ValueError:
            raise InputError(f"--prune {spec!r}: {key}={value!r} is not a number") from None
        if not 0.0 < frac <= 1.0:
            raise InputError(f"--prune {spec!r}: {key}={frac:g} must be a kept fraction in (0, 1]")
        values[key] = frac
    if not values:
        raise InputError(f"--prune {spec!r}: nothing to prune; e.g. ffn=0.5,heads=0.75")
    return PruneSpec(**values)


def _kept_count(n: int, frac: float, multiple_of: int = 1) -> int:
    k = max(1, round(n * frac))
    if multiple_of > 1 and n >= multiple_of:
        k = max(multiple_of, (k // multiple_of) * multiple_of)
    return min(n, k)


# -- finding prunable units -------------------------------------------------------------------


def _ffn_parts(module):
    """(up Linear, down Linear, gated) of a diffusers FeedForward-like module, else None."""
    net = getattr(module, "net", None)
    if not isinstance(net, torch.nn.ModuleList) or len(net) < 2:
        return None
    up = getattr(net[0], "proj", None)
    linears = [m for m in list(net)[1:] if isinstance(m, torch.nn.Linear)]
    if not isinstance(up, torch.nn.Linear) or len(linears) != 1:
        return None
    down = linears[0]
    if up.out_features == down.in_features:
        return up, down, False
    if up.out_features == 2 * down.in_features:
        return up, down, True
    return None


def _is_attention(module) -> bool:
    return all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in ("to_q", "to_k", "to_v")) and hasattr(
        module, "heads"
    ) and isinstance(getattr(module, "to_out", None), (torch.nn.ModuleList, torch.nn.Sequential))


def find_units(module: torch.nn.Module) -> tuple[list, list]:
    """(FFN modules, attention modules) that `prune` knows how to shrink."""
    ffns, attns = [], []
    for name, m in module.named_modules():
        if _ffn_parts(m) is not None:
            ffns.append((name, m))
        elif _is_attention(m):
            attns.append((name, m))
    return ffns, attns


# -- importance -------------------------------------------------------------------------------


def _row_norms(linear: torch.nn.Linear) -> torch.Tensor:
    w = linear.weight.detach().float()
    sq = (w * w).sum(dim=1)
    if linear.bias is not None:
        sq = sq + linear.bias.detach().float() ** 2
    return sq


def _col_norms(linear: torch.nn.Linear) -> torch.Tensor:
    w = linear.weight.detach().float()
    return (w * w).sum(dim=0)


def _collect_activations(module, ffns, attns, calibration_inputs) -> dict:
    """Mean |input| per channel of every FFN down-projection and attention out-projection."""
    stats: dict[int, torch.Tensor] = {}
    hooks = []

    def hook_for(key):
        def hook(_mod, args):
            x = args[0].detach().float()
            stats[key] = stats.get(key, 0) + x.abs().reshape(-1, x.shape[-1]).mean(dim=0)

        return hook

    for _, m in ffns:
        hooks.append(_ffn_parts(m)[1].register_forward_pre_hook(hook_for(id(m))))
    for _, m in attns:
        hooks.append(m.to_out[0].register_forward_pre_hook(hook_for(id(m))))
    try:
        inputs = list(calibration_inputs.values()) if isinstance(calibration_inputs, dict) else list(calibration_inputs)
        inputs = [torch.as_tensor(v) for v in inputs]
        with torch.no_grad():
            module(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return stats


def _ffn_scores(m, act) -> torch.Tensor:
    up, down, gated = _ffn_parts(m)
    inner = down.in_features
    if act is not None:
        src = act
    else:
        rows = _row_norms(up)
        src = (rows[:inner] + rows[inner:]) if gated else rows
        src = src.sqrt()
    return src * _col_norms(down).sqrt()


def _head_scores(m, act) -> torch.Tensor:
    heads = int(m.heads)
    out = m.to_out[0]
    out_cols = _col_norms(out).reshape(heads, -1).sum(dim=1).sqrt()
    if act is not None:
        src = act.reshape(heads, -1).norm(dim=1)
    else:
        src = _row_norms(m.to_v).reshape(heads, -1).sum(dim=1)
        if getattr(m, "add_v_proj", None) is not None:
            src = src + _row_norms(m.add_v_proj).reshape(heads, -1).sum(dim=1)
        src = src.sqrt()
    return src * out_cols


# -- slicing ----------------------------------------------------------------------------------


def _slice_linear(linear: torch.nn.Linear, rows=None, cols=None) -> torch.nn.Linear:
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new.train(linear.training)


def _slice_norm(norm, idx) -> None:
    """Slice an RMSNorm/LayerNorm over the pruned axis in place (weight, bias, normalized_shape)."""
    if norm is None or isinstance(norm, torch.nn.Identity):
        return
    for pname in ("weight", "bias"):
        p = getattr(norm, pname, None)
        if isinstance(p, torch.nn.Parameter):
            setattr(norm, pname, torch.nn.Parameter(p.detach()[idx].clone(), requires_grad=p.requires_grad))
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (len(idx),)
    if hasattr(norm, "dim") and isinstance(norm.dim, int):
        norm.dim = len(idx)


def _prune_ffn(m, keep: torch.Tensor) -> None:
    up, down, gated = _ffn_parts(m)
    inner = down.in_features
    rows = torch.cat([keep, keep + inner]) if gated else keep
    m.net[0].proj = _slice_linear(up, rows=rows)
    idx = [i for i, layer in enumerate(m.net) if layer is down][0]
    m.net[idx] = _slice_linear(down, cols=keep)


def _prune_heads(m, keep_heads: torch.Tensor) -> None:
    heads = int(m.heads)
    q_head = m.to_q.out_features // heads
    kv_head = m.to_k.out_features // heads
    q_idx = (keep_heads[:, None] * q_head + torch.arange(q_head)).reshape(-1)
    kv_idx = (keep_heads[:, None] * kv_head + torch.arange(kv_head)).reshape(-1)
    m.to_q = _slice_linear(m.to_q, rows=q_idx)
    m.to_k = _slice_linear(m.to_k, rows=kv_idx)
    m.to_v = _slice_linear(m.to_v, rows=kv_idx)
    m.to_out[0] = _slice_linear(m.to_out[0], cols=q_idx)
    _slice_norm(getattr(m, "norm_q", None), q_idx)
    _slice_norm(getattr(m, "norm_k", None), kv_idx)
    for name in ("add_k_proj", "add_v_proj"):
        if getattr(m, name, None) is not None:
            setattr(m, name, _slice_linear(getattr(m, name), rows=q_idx))
    if getattr(m, "add_k_proj", None) is not None:
        _slice_norm(getattr(m, "norm_added_k", None), q_idx)
    m.heads = len(keep_heads)
    for attr, value in (("inner_dim", len(q_idx)), ("kv_inner_dim", len(kv_idx))):
        if hasattr(m, attr):
            setattr(m, attr, value)


def prune_module(
    module: torch.nn.Module,
    spec: str | dict | PruneSpec,
    score: str = "magnitude",
    calibration_inputs=None,
    ffn_multiple_of: int = 8,
    inplace: bool = False,
) -> tuple[torch.nn.Module, dict]:
    """Prune a torch module; returns (pruned module, info). See the module docstring."""
    spec = parse_spec(spec)
    if score not in ("magnitude", "activation"):
        raise InputError(f"prune score '{score}': use 'magnitude' or 'activation'")
    if score == "activation" and calibration_inputs is None:
        raise InputError("prune score='activation' needs calibration_inputs (the module's inputs)")
    if not inplace:
        module = copy.deepcopy(module)
    params_before = sum(p.numel() for p in module.parameters())
    ffns, attns = find_units(module)
    for _, m in attns:
        if getattr(m, "fused_projections", False):
            m.unfuse_projections()
    if spec.ffn < 1.0 and not ffns:
        raise InputError(f"--prune ffn: {type(module).__name__} has no feed-forward block autotune can prune")
    if spec.heads < 1.0 and not attns:
        raise InputError(f"--prune heads: {type(module).__name__} has no attention layer autotune can prune")
    acts = _collect_activations(module, ffns, attns, calibration_inputs) if score == "activation" else {}
    layers = []
    if spec.ffn < 1.0:
        for name, m in ffns:
            width = _ffn_parts(m)[1].in_features
            k = _kept_count(width, spec.ffn, ffn_multiple_of)
            keep = torch.sort(torch.topk(_ffn_scores(m, acts.get(id(m))), k).indices).values
            _prune_ffn(m, keep)
            layers.append({"module": name, "kind": "ffn", "before": width, "after": k})
    if spec.heads < 1.0:
        for name, m in attns:
            heads = int(m.heads)
            k = _kept_count(heads, spec.heads)
            keep = torch.sort(torch.topk(_head_scores(m, acts.get(id(m))), k).indices).values
            _prune_heads(m, keep)
            layers.append({"module": name, "kind": "heads", "before": heads, "after": k, "kept": keep.tolist()})
    params_after = sum(p.numel() for p in module.parameters())
    info = {
        "pass": "prune",
        "spec": str(spec),
        "score": score,
        "params_before": params_before,
        "params_after": params_after,
        "ffn_layers": sum(1 for layer in layers if layer["kind"] == "ffn"),
        "attention_layers": sum(1 for layer in layers if layer["kind"] == "heads"),
        "layers": layers,
    }
    return module.eval(), info


def prune(imported_or_module, spec: str | dict | PruneSpec, score: str = "magnitude", calibration_inputs=None, **kwargs):
    """Structured pruning; returns (pruned thing of the same kind, info dict).

    imported_or_module:
      torch.nn.Module   -> a pruned deep copy (the argument is left as it was);
      ModelSource       -> a new ModelSource: its torch module pruned and re-imported with the
                           same example inputs (its `reference` is the *pruned* module, so
                           reference_outputs() checks the compile; compare against the original
                           source's reference_outputs() to measure what pruning itself costs).
                           score="activation" calibrates on the source's example inputs.
      ImportedModel     -> InputError: prune the torch module before importing (see module doc).
    spec: "ffn=0.5,heads=0.75" (kept fractions).
    info: {"pass": "prune", "spec", "score", "params_before", "params_after", "ffn_layers",
           "attention_layers", "layers": [{"module", "kind", "before", "after"}, ...]}.

    CLI: `autotune build/tune --prune SPEC`: after `source = load_source(...)`, call
    `source, info = prune(source, SPEC)` and build/tune `source.imported` (store `info` in the
    artifact's metadata).
    """
    from .importer import ImportedModel
    from .sources import ModelSource

    if isinstance(imported_or_module, torch.nn.Module):
        return prune_module(imported_or_module, spec, score=score, calibration_inputs=calibration_inputs, **kwargs)
    if isinstance(imported_or_module, ModelSource):
        source = imported_or_module
        if source.reference is None:
            raise InputError(
                f"--prune: {source.label} was imported from a file (no torch module); structured pruning needs the "
                "torch module. Use a zoo model, or prune before exporting the file."
            )
        from autotune.support.signature import TensorSpec

        from .importer import from_torch

        example = {k: torch.from_numpy(v) for k, v in source.example_inputs.items()}
        if score == "activation" and calibration_inputs is None:
            calibration_inputs = example
        module, info = prune_module(source.reference, spec, score=score, calibration_inputs=calibration_inputs, **kwargs)
        imported = from_torch(module, example, source=source.imported.source)
        imported.outputs = [TensorSpec(o.name, n.shape, n.dtype) for o, n in zip(source.imported.outputs, imported.outputs)]
        imported.notes = list(source.imported.notes) + [f"pruned: {info['spec']}"]
        info["weight_bytes_before"] = source.imported.weight_bytes()
        info["weight_bytes_after"] = imported.weight_bytes()
        return (
            ModelSource(source.name, source.label, imported, source.example_inputs, module, model_name=source.model_name),
            info,
        )
    if isinstance(imported_or_module, ImportedModel):
        raise InputError(
            "prune() works on the torch module before import (head counts and FFN widths are constants in the "
            "imported Relax shapes). Pass the nn.Module, or the ModelSource from autotune.frontend.sources.load_source."
        )
    raise InputError(f"prune(): expected an nn.Module or a ModelSource, got {type(imported_or_module).__name__}")
