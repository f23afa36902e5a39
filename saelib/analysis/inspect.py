"""Reading latents of any SAE: top activating contexts, top logits and latent views.

Works on any SAE with ``encode`` and ``W_dec`` (saelib, SAELens) and a TransformerBridge model
(``saelib.lm.models.load_model``). A latent view can add a meta-SAE decomposition
(``saelib.analysis.meta.decompose``), but does not need one.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from saelib.analysis.evaluate import sae_hook_name
from saelib.lm.activations import harvest

__all__ = ["Context", "top_activating_contexts", "unembedding", "top_logits", "latent_view", "latent_view_html"]


class Context(NamedTuple):
    """One top-activating token context of a latent."""

    latent: int
    act: float
    row: int
    """Row of the token matrix."""
    pos: int
    """Position of the active token in the row."""
    text: str
    """The window with the active token marked ``[[tok]]``."""
    html: str
    """The same, with the active token in ``<mark>``."""


def _token_strs(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids]


@torch.no_grad()
def top_activating_contexts(model: Any, sae: Any, tokens: torch.Tensor, latents: int | Sequence[int], *,
                            n: int = 10, hook: str | None = None, batch_size: int = 16,
                            before: int = 8, after: int = 2, exclude_bos: bool = True,
                            progress: bool = False) -> dict[int, list[Context]]:
    """Top ``n`` activating token contexts of each latent of ``sae`` over ``tokens [R, S]``.

    One forward of ``model`` per batch of rows, stopped at the hook (default: the SAE's); the
    activations of all requested latents are kept as a running top-``n``. Returns
    ``{latent: [Context, ...]}`` sorted by activation (only positive activations); contexts
    show ``before`` tokens before and ``after`` after the active one.
    """
    single = isinstance(latents, (int, np.integer))
    lat = torch.tensor([int(latents)] if single else [int(x) for x in latents], dtype=torch.long)
    if lat.numel() == 0:
        return {}
    hook = hook or sae_hook_name(sae)
    if not hook:
        raise ValueError("The SAE records no hook name: pass hook='blocks.L.hook_resid_pre'.")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [rows, seq_len] token ids (got shape {tuple(tokens.shape)}).")
    R, S = tokens.shape
    best_v = torch.full((lat.numel(), n), -float("inf"))
    best_i = torch.full((lat.numel(), n), -1, dtype=torch.long)
    dev = sae.W_dec.device
    for s in tqdm(range(0, R, batch_size), desc="contexts", disable=not progress, leave=False):
        toks = tokens[s : s + batch_size]
        x = harvest(model, toks, [hook], batch_size=toks.shape[0], exclude_bos=False, progress=False)[hook]
        acts = sae.encode(x.float().to(dev)).float().cpu()[:, lat].reshape(toks.shape[0], S, -1)
        if exclude_bos:
            acts[:, 0] = -float("inf")
        flat = acts.reshape(-1, lat.numel()).T  # [L, b*S]
        v, i = flat.topk(min(n, flat.shape[1]), dim=1)
        cat_v, cat_i = torch.cat([best_v, v], 1), torch.cat([best_i, i + s * S], 1)  # global index row*S + pos
        top = cat_v.topk(n, dim=1).indices
        best_v, best_i = cat_v.gather(1, top), cat_i.gather(1, top)
    out: dict[int, list[Context]] = {}
    for li, latent in enumerate(lat.tolist()):
        ctxs = []
        for v, gi in zip(best_v[li].tolist(), best_i[li].tolist()):
            if gi < 0 or not v > 0:
                continue
            r, p = divmod(gi, S)
            lo, hi = max(0, p - before), min(S, p + after + 1)
            strs = _token_strs(model.tokenizer, tokens[r, lo:hi].tolist())
            j = p - lo
            pre, mid, post = "".join(strs[:j]), strs[j], "".join(strs[j + 1:])
            text = (pre + "[[" + mid + "]]" + post).replace("\n", "↵")
            htm = (html.escape(pre) + "<mark><b>" + html.escape(mid) + "</b></mark>" + html.escape(post)).replace("\n", "↵")
            ctxs.append(Context(latent, v, r, p, text, htm))
        out[latent] = ctxs
    return out


def unembedding(model: Any) -> torch.Tensor:
    """The model's unembedding ``W_U [d_model, d_vocab]`` (TransformerBridge or HF model)."""
    for get in (lambda m: m.W_U, lambda m: m.unembed.W_U, lambda m: m.lm_head.weight.T,
                lambda m: m.original_model.lm_head.weight.T):
        try:
            W = get(model)
        except (AttributeError, TypeError, KeyError, NotImplementedError):
            continue
        if isinstance(W, torch.Tensor) and W.ndim == 2:
            return W.detach()
    raise ValueError("Could not find the model's unembedding (tried W_U, unembed.W_U, lm_head).")


@torch.no_grad()
def top_logits(direction: torch.Tensor, model: Any = None, *, W_U: torch.Tensor | None = None,
               k: int = 10, tokenizer: Any = None) -> list[tuple[str, float]]:
    """Top ``k`` boosted tokens of a residual direction: ``direction @ W_U`` (no final norm)."""
    W_U = W_U if W_U is not None else unembedding(model)
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("top_logits needs a tokenizer: pass model=... or tokenizer=....")
    v, i = (direction.detach().float().to(W_U.device) @ W_U.float()).topk(k)
    return list(zip(_token_strs(tokenizer, i.tolist()), v.tolist()))


def _meta_rows(latent: int, decomposition: Any, members: Any, n_members: int) -> list[tuple[int, float, str]]:
    """(meta-latent, activation, members text) of a decomposition."""
    if decomposition is None:
        return []
    rows = []
    for c, a in zip(decomposition.meta_latents, decomposition.acts):
        mem = ""
        if members is not None:
            others = [m for m in members[c].meta_latents if m != latent][:n_members]
            mem = f"in {len(members[c].meta_latents)} latents; others: {others}"
        rows.append((c, a, mem))
    return rows


def latent_view(latent: int, decomposition: Any = None, *, contexts: list[Context] | None = None,
                members: Any = None, meta_logits: dict[int, list] | None = None,
                latent_logits: list | None = None, labels: dict[int, str] | None = None,
                n_members: int = 5) -> str:
    """A plain-text view of one latent: its top logits and contexts and, given a meta-SAE
    ``decomposition`` (``saelib.analysis.meta.Decomposition``), its meta-latents.

    ``members``: ``saelib.analysis.meta.inverse_index``, to list other latents that share each
    meta-latent. ``meta_logits``: meta-latent -> top logits. ``labels``: meta-latent -> a label.
    """
    lines = [f"latent {latent}"]
    if latent_logits:
        lines.append("  top logits: " + ", ".join(f"{t!r}" for t, _ in latent_logits))
    if contexts:
        lines.append("  top contexts:")
        lines += [f"    {c.act:7.3f}  {c.text}" for c in contexts]
    if decomposition is not None:
        lines.append(f"  meta-latents ({len(decomposition.meta_latents)}):")
    for c, a, mem in _meta_rows(latent, decomposition, members, n_members):
        lab = f"  [{labels[c]}]" if labels and c in labels else ""
        lines.append(f"    meta {c:5d}  act {a:.3f}{lab}" + (f"  {mem}" if mem else ""))
        if meta_logits and c in meta_logits:
            lines.append("        logits: " + ", ".join(f"{t!r}" for t, _ in meta_logits[c]))
    return "\n".join(lines)


def latent_view_html(latent: int, decomposition: Any = None, *, contexts: list[Context] | None = None,
                     members: Any = None, meta_logits: dict[int, list] | None = None,
                     latent_logits: list | None = None, labels: dict[int, str] | None = None,
                     n_members: int = 5) -> str:
    """HTML version of :func:`latent_view` (for ``IPython.display.HTML`` in notebooks)."""
    esc = html.escape
    parts = [f"<div style='font-family:sans-serif;font-size:90%'><b>latent {latent}</b>"]
    if latent_logits:
        parts.append("<div>top logits: " + ", ".join(f"<code>{esc(repr(t))}</code>" for t, _ in latent_logits)
                     + "</div>")
    if contexts:
        parts.append("<table>" + "".join(
            f"<tr><td style='text-align:right'>{c.act:.3f}</td><td style='text-align:left'>{c.html}</td></tr>"
            for c in contexts) + "</table>")
    if decomposition is not None:
        rows = [f"<tr><td>{c}</td><td>{a:.3f}</td><td>{esc(labels[c]) if labels and c in labels else ''}</td>"
                f"<td>{esc(mem)}</td><td>{', '.join(esc(repr(t)) for t, _ in (meta_logits or {}).get(c, []))}</td></tr>"
                for c, a, mem in _meta_rows(latent, decomposition, members, n_members)]
        parts.append("<table><tr><th>meta-latent</th><th>act</th><th>label</th><th>members</th>"
                     "<th>top logits</th></tr>" + "".join(rows) + "</table>")
    return "".join(parts) + "</div>"
