"""Residual-stream activations: harvest them, or stream them shuffled.

Every reader yields ``dict[hook_name, Tensor[batch, d]]``:

* :func:`harvest` — one pass of the model over token rows, every requested hook in memory.
* :class:`ActivationStore` — on-the-fly generation into a shuffled mixing buffer (SAELens /
  dictionary_learning style): one model pass serves every hook and every SAE reading it.
* :func:`tensor_batches` — shuffled batches over in-memory tensors.
* :func:`residual_norms` — only ``||x||`` at every layer (chapter 1).

The on-disk cache replayed by sweeps is ``saelib.lm.cache.ActivationCache``.

Every forward stops once the deepest requested hook has fired (a private exception raised from
that hook, as dictionary_learning does): layer 3 of a 30-layer model costs 3 layers. Position 0
of every row (the BOS token ``saelib.lm.data.token_rows`` puts there) is dropped by default: its
residual norm is about a hundred times the others' and would dominate any SAE loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelib.lm.models import check_hook, model_device

__all__ = ["ActivationStore", "harvest", "residual_norms", "tensor_batches"]


class _StopForward(Exception):
    """Raised from the last needed hook to end the forward pass early."""


# --------------------------------------------------------------------------------------------
# One forward pass
# --------------------------------------------------------------------------------------------


def _as_hooks(model, hooks: str | Sequence[str]) -> list[str]:
    if isinstance(hooks, str):
        hooks = [hooks]
    hooks = list(dict.fromkeys(hooks))  # keep order, drop repeats
    if not hooks:
        raise ValueError("hooks is empty: pass at least one hook name such as 'blocks.3.hook_resid_pre'.")
    for h in hooks:
        check_hook(model, h)
    return hooks


def _check_tokens(tokens: Tensor, exclude_bos: bool, model=None) -> Tensor:
    if isinstance(tokens, np.ndarray):
        raise ValueError(
            f"tokens is a numpy array {tokens.shape}; pass a torch LongTensor [n_rows, seq_len] "
            "(torch.from_numpy(tokens).long()), e.g. from saelib.lm.data.token_rows."
        )
    if not isinstance(tokens, Tensor) or tokens.ndim != 2:
        raise ValueError(
            "tokens must be a 2-D LongTensor [n_rows, seq_len] (e.g. from saelib.lm.data.token_rows), "
            f"got {type(tokens).__name__}{tuple(tokens.shape) if isinstance(tokens, Tensor) else ''}."
        )
    if tokens.is_floating_point():
        raise ValueError("tokens must hold integer token ids, got a floating-point tensor.")
    if tokens.shape[0] == 0:
        raise ValueError("tokens has no rows: nothing to run the model on.")
    if exclude_bos and tokens.shape[1] < 2:
        raise ValueError("rows need at least 2 tokens when exclude_bos=True (position 0 is dropped).")
    tokens = tokens.long()
    vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or (vocab is not None and hi >= int(vocab)):
        bad = lo if lo < 0 else hi
        name = getattr(model, "saelib_name", None) or getattr(getattr(model, "cfg", None), "model_name", "the model")
        raise ValueError(
            f"tokens holds id {bad}, outside the vocabulary of {name} (ids 0..{int(vocab) - 1 if vocab else '?'}): "
            "tokenize with this model's tokenizer (saelib.lm.data.token_rows(model, ...)) and do not mix models."
        )
    return tokens


def _forward_capture(model, tokens_BS: Tensor, hooks: list[str], exclude_bos: bool) -> dict[str, Tensor]:
    """Activations ``{hook: Tensor[B * S', d]}`` of one batch (S' = S - 1 without BOS), on the model's device."""
    captured: dict[str, Tensor] = {}
    n_hooks = len(hooks)

    def make(name: str):
        def fn(act: Tensor, hook) -> Tensor:
            captured[name] = act
            if len(captured) == n_hooks:
                raise _StopForward  # nothing later in the network is needed
            return act

        return fn

    with torch.inference_mode(), model.hooks(fwd_hooks=[(h, make(h)) for h in hooks]):
        try:
            model(tokens_BS.to(model_device(model)))
        except _StopForward:
            pass
    missing = [h for h in hooks if h not in captured]
    if missing:
        raise RuntimeError(f"the forward pass never reached hooks {missing}; they cannot be harvested.")
    start = 1 if exclude_bos else 0
    out = {}
    for h in hooks:
        act = captured[h]
        act = act.reshape(act.shape[0], act.shape[1], -1)[:, start:]
        out[h] = act.reshape(-1, act.shape[-1])
    return out


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not enabled, smoothing=0.1)


def harvest(
    model,
    tokens: Tensor,
    hooks: str | Sequence[str],
    *,
    batch_size: int = 32,
    exclude_bos: bool = True,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """Run ``model`` over ``tokens`` (``LongTensor[n_rows, seq_len]``) and return ``{hook: Tensor[N, d]}``.

    Every hook is filled by the same forward passes of ``batch_size`` rows; with ``exclude_bos``
    position 0 of each row is dropped, so ``N = n_rows * (seq_len - 1)``. The result lives on
    ``device`` (CPU by default, so large harvests do not fill the GPU).
    """
    hooks = _as_hooks(model, hooks)
    tokens = _check_tokens(tokens, exclude_bos, model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_rows, seq_len = tokens.shape
    per_row = seq_len - 1 if exclude_bos else seq_len
    out: dict[str, Tensor] = {}
    bar = _progress(n_rows * per_row, "harvest", progress)
    for r0 in range(0, n_rows, batch_size):
        acts = _forward_capture(model, tokens[r0 : r0 + batch_size], hooks, exclude_bos)
        for h, a in acts.items():
            if h not in out:  # allocate once we know d for this hook
                out[h] = torch.empty(n_rows * per_row, a.shape[-1], dtype=dtype, device=device)
            out[h][r0 * per_row : r0 * per_row + a.shape[0]] = a
        bar.update(min(batch_size, n_rows - r0) * per_row)
    bar.close()
    return out


# --------------------------------------------------------------------------------------------
# Index streams shared by the in-memory and on-disk readers
# --------------------------------------------------------------------------------------------


def _index_batches(
    n: int, batch_size: int, *, shuffle: bool, seed: int, epochs: int, n_tokens: int | None
) -> Iterator[Tensor]:
    """Batches of row indices into ``n`` items: one permutation per epoch, chained across epochs.

    Serves ``n_tokens`` items in total when given (cycling as many epochs as needed), else
    ``epochs * n``. A final batch shorter than ``batch_size`` is dropped.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < 1:
        raise ValueError("there are no activations to batch (0 tokens).")
    if n_tokens is None and epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    total = n_tokens if n_tokens is not None else epochs * n
    if total < batch_size:
        raise ValueError(
            f"only {total} tokens to serve, fewer than one batch of {batch_size}: "
            "lower batch_size or provide more tokens."
        )

    def order(epoch: int) -> Tensor:
        if not shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))

    epoch, perm, pos = 0, order(0), 0
    for _ in range(total // batch_size):
        parts, need = [], batch_size
        while need:  # a batch may straddle two epochs (never more than needed: no O(n) copies)
            if pos == n:
                epoch, perm, pos = epoch + 1, order(epoch + 1), 0
            take = min(need, n - pos)
            parts.append(perm[pos : pos + take])
            pos, need = pos + take, need - take
        yield parts[0] if len(parts) == 1 else torch.cat(parts)


def tensor_batches(
    acts: dict[str, Tensor] | Tensor,
    batch_size: int,
    *,
    seed: int = 0,
    epochs: int = 1,
    shuffle: bool = True,
    n_tokens: int | None = None,
) -> Iterator[dict[str, Tensor]] | Iterator[Tensor]:
    """Shuffled batches over in-memory activations.

    ``acts`` is ``{hook: Tensor[N, d]}`` (every hook indexed by the same token order, so batches
    stay aligned across hooks) or a single ``Tensor[N, d]``; the batches have the same form.
    Serves ``epochs`` passes, or ``n_tokens`` tokens when given; a short last batch is dropped.
    """
    single = isinstance(acts, Tensor)
    d = {"_": acts} if single else dict(acts)
    if not d:
        raise ValueError("acts is empty.")
    sizes = {k: v.shape[0] for k, v in d.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"all tensors need the same number of rows, got {sizes}")
    n = next(iter(sizes.values()))
    for idx in _index_batches(n, batch_size, shuffle=shuffle, seed=seed, epochs=epochs, n_tokens=n_tokens):
        idx = idx.to(next(iter(d.values())).device)
        if single:
            yield acts[idx]
        else:
            yield {k: v[idx] for k, v in d.items()}


# --------------------------------------------------------------------------------------------
# On-the-fly shuffled store
# --------------------------------------------------------------------------------------------


class ActivationStore:
    """Shuffled activation batches generated on the fly from token rows.

    A mixing buffer of ``buffer_tokens`` activations per hook is filled from the model, shuffled,
    and half of it is served in batches of ``batch_size``; the other half stays to mix with the
    next fill, so consecutive batches mix tokens from many sequences (not one document at a
    time). ``epochs`` passes over ``tokens`` (rows in the given order the first time, in a
    seeded permutation in every later pass); iterating again starts over with the same order.
    This is the source for runs whose activations would not fit on disk (the paper's 80 M tokens
    x 576 dims is 184 GB per layer in float32).

    The model runs on chunks of ``model_batch_size`` rows; :meth:`_capture_chunks` is the one
    place that runs them (``saelib.sae.distributed.DistributedActivationStore`` spreads the chunks
    of each fill over ranks and gathers them, so every rank serves the same stream). The whole
    stream is deterministic given ``seed``; ``buffer_tokens`` defaults to ``16 * batch_size``
    (at least ``2 * batch_size``); buffer and batches live on ``device`` (default: the model's).
    """

    def __init__(
        self,
        model,
        tokens: Tensor,
        hooks: str | Sequence[str],
        *,
        batch_size: int = 4096,
        buffer_tokens: int | None = None,
        model_batch_size: int = 32,
        exclude_bos: bool = True,
        seed: int = 0,
        epochs: int = 1,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        progress: bool = False,
    ) -> None:
        self.model = model
        self.hooks = _as_hooks(model, hooks)
        self.tokens = _check_tokens(tokens, exclude_bos, model)
        self.exclude_bos = exclude_bos
        if batch_size < 1 or model_batch_size < 1:
            raise ValueError(f"batch_size and model_batch_size must be >= 1, got {batch_size}, {model_batch_size}")
        self.batch_size = batch_size
        self.buffer_tokens = buffer_tokens if buffer_tokens is not None else 16 * batch_size
        self.model_batch_size = model_batch_size
        self.per_row = self.tokens.shape[1] - (1 if exclude_bos else 0)
        if self.buffer_tokens < 2 * batch_size:
            raise ValueError(
                f"buffer_tokens={self.buffer_tokens} must be at least 2 * batch_size = {2 * batch_size} "
                "so that half the buffer can be served while the other half mixes with new data."
            )
        if model_batch_size * self.per_row > self.buffer_tokens // 2:
            raise ValueError(
                f"one forward pass ({model_batch_size} rows x {self.per_row} tokens) does not fit in half "
                f"the buffer ({self.buffer_tokens // 2} tokens): lower model_batch_size or raise buffer_tokens."
            )
        self.seed = seed
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1 (passes over the token rows), got {epochs!r}")
        self.epochs = epochs
        self.device = torch.device(device) if device is not None else model_device(model)
        self.dtype = dtype
        self.progress = progress
        self.n_tokens_seen = 0
        """Activations (per hook) served so far by the current iteration."""

    @property
    def n_tokens(self) -> int:
        """Activations per hook in one full pass over the token rows."""
        return self.tokens.shape[0] * self.per_row

    def __len__(self) -> int:
        """Batches served over all epochs (a last partial batch is dropped)."""
        return self.epochs * self.n_tokens // self.batch_size

    def _row_order(self) -> Tensor:
        """Row indices of the whole stream: epoch 0 in order, later epochs permuted (seeded)."""
        n = self.tokens.shape[0]
        parts = [torch.arange(n)]
        for e in range(1, self.epochs):
            parts.append(torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + e)))
        return torch.cat(parts)

    def _capture_chunks(self, chunks: list[Tensor]) -> Iterator[dict[str, Tensor]]:
        """Activations ``{hook: [rows * per_row, d]}`` of each chunk of token rows, in order:
        one forward pass per chunk."""
        for rows in chunks:
            yield _forward_capture(self.model, self.tokens[rows], self.hooks, self.exclude_bos)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        self.n_tokens_seen = 0
        gen = torch.Generator().manual_seed(self.seed)
        cap, bs = self.buffer_tokens, self.batch_size
        buf: dict[str, Tensor] = {}
        n_buf = 0
        order = self._row_order()
        n_rows = order.shape[0]
        next_row = 0
        bar = _progress(n_rows * self.per_row, "activations", self.progress)
        try:
            while True:
                # Refill up to capacity (whole forward batches only).
                chunks, n_new = [], 0
                while next_row < n_rows:
                    rows = min(self.model_batch_size, n_rows - next_row)
                    if n_buf + n_new + rows * self.per_row > cap:
                        break
                    chunks.append(order[next_row : next_row + rows])
                    n_new += rows * self.per_row
                    next_row += rows
                for acts in self._capture_chunks(chunks):
                    for h, a in acts.items():
                        if h not in buf:
                            buf[h] = torch.empty(cap, a.shape[-1], dtype=self.dtype, device=self.device)
                        buf[h][n_buf : n_buf + a.shape[0]] = a
                    n_buf += a.shape[0]
                    bar.update(a.shape[0])
                if n_buf < bs:
                    return
                perm = torch.randperm(n_buf, generator=gen).to(self.device)
                for h in buf:
                    buf[h][:n_buf] = buf[h][:n_buf][perm]
                # Serve half the buffer (all of it once the tokens are exhausted), from the tail,
                # so the kept half already sits at the front for the next fill.
                serve = n_buf // 2 if next_row < n_rows else n_buf
                n_batches = max(1, serve // bs)
                for _ in range(n_batches):
                    n_buf -= bs
                    self.n_tokens_seen += bs
                    yield {h: buf[h][n_buf : n_buf + bs].clone() for h in self.hooks}
        finally:
            bar.close()


# --------------------------------------------------------------------------------------------
# Norm summaries (chapter 1)
# --------------------------------------------------------------------------------------------


def residual_norms(
    model,
    tokens: Tensor,
    hooks: str | Sequence[str] | None = None,
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> Tensor:
    """``||x||_2`` of every token at every hook: ``Tensor[n_hooks, n_rows, seq_len]`` (BOS kept).

    Only the norms are kept, so all layers of a model fit in memory for many tokens. Default
    hooks: ``blocks.{L}.hook_resid_pre`` for every layer, in one (full-depth) pass per batch.
    """
    if hooks is None:
        hooks = [f"blocks.{layer}.hook_resid_pre" for layer in range(int(model.cfg.n_layers))]
    hooks = _as_hooks(model, hooks)
    tokens = _check_tokens(tokens, exclude_bos=False, model=model)
    n_rows, seq_len = tokens.shape
    out = torch.empty(len(hooks), n_rows, seq_len)
    bar = _progress(n_rows * seq_len, "norms", progress)
    for r0 in range(0, n_rows, batch_size):
        acts = _forward_capture(model, tokens[r0 : r0 + batch_size], hooks, exclude_bos=False)
        for i, h in enumerate(hooks):
            a = acts[h].float()
            out[i, r0 : r0 + batch_size] = a.norm(dim=-1).view(-1, seq_len).cpu()
        bar.update(min(batch_size, n_rows - r0) * seq_len)
    bar.close()
    return out
