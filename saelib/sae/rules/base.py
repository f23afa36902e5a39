"""The base class of an activation rule: what an SAE asks its rule (see :mod:`saelib.sae.rules`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:  # annotations only: saelib.sae.core imports the rules, not the other way round
    from saelib.sae.core import SAE, SAEConfig


class Rule:
    """One activation rule. Subclasses set the attributes and override the hooks they need;
    the defaults are a plain ReLU SAE (keep every positive pre-activation, no extra state)."""

    name: str = ""
    label: str = ""
    """Human-readable name for legends."""
    paper_label: str = ""
    """The name in the top-AFA paper's tables ("Top-k", "Batch Top-k", "Top-AFA")."""
    color: str = "#333333"
    linestyle: str = "-"
    knob: str | None = None
    """The SAEConfig field of the sparsity knob ("k", "afa_coeff", "l1_coeff", "l0_coeff")."""
    knob_tag: str = ""
    """Prefix of the knob in sweep folder names (``<hook>-<rule>-<tag><value>-s<seed>``)."""
    knob_default: float | None = None
    """Value of the knob when the config leaves it None (None: the knob is required)."""
    uses_b_enc: bool = False
    """Encoder-bias default."""
    competes: bool = False
    """Latents compete for a fixed budget (TopK, top-AFA): adding a latent can evict another."""
    needs_x: bool = False
    """The selection needs the input (top-AFA's target norm)."""
    per_token_k: bool = False
    """Each token keeps exactly min(k, its positive pre-activations) latents (a checked invariant)."""
    has_reference = False
    """:meth:`reference_mask` gives a slow reference of the fast selection (checked in the chapters)."""
    mask_is_positive: bool = False
    """The keep-mask already excludes zero pre-activations."""
    uses_key_buffer: bool = False
    """The selection can use a scratch [N, d_sae] buffer (the training forward lends it one)."""
    calibrates: bool = False
    """The rule re-estimates an inference threshold after training (:meth:`calibrate`)."""
    cost: float = 1.0
    """Relative cost of a training step (rank planning in :mod:`saelib.sae.distributed`)."""
    saelens_name: str = "standard"
    """SAELens architecture it exports to."""
    saelens_loads: tuple[str, ...] = ()
    """SAELens architectures that load as this rule when no saelib metadata says otherwise."""
    saelens_lossy: str | None = None
    """Why an SAELens export cannot be faithful (None: it is exact)."""

    # ------------------------------------------------------------------ config
    def validate(self, cfg: "SAEConfig") -> None:
        """Fill the knob default and check rule-specific fields; errors say how to fix."""
        if self.knob == "k":
            if cfg.k is None:
                raise ValueError(f"activation={self.name!r} needs k (latents per token); pass e.g. k=64")
            if isinstance(cfg.k, bool) or not isinstance(cfg.k, int) or cfg.k <= 0:
                raise ValueError(f"k must be a positive int, got {cfg.k!r}")
            if cfg.k > cfg.d_sae:
                raise ValueError(f"k={cfg.k} > d_sae={cfg.d_sae}: cannot keep more latents than exist; lower k or raise d_sae")

    def knob_value(self, cfg: Any) -> Any:
        get = cfg.get if isinstance(cfg, dict) else (lambda f: getattr(cfg, f, None))
        return get(self.knob) if self.knob else None

    def knob_label(self, value: Any) -> str:
        """The knob as a short table label, e.g. ``k=32`` or ``λ=1/16``."""
        return f"{self.knob_tag}={value:g}"

    # ------------------------------------------------------------------ state and selection
    def init_state(self, sae: "SAE") -> None:
        """Register rule-specific parameters or buffers on a new SAE."""

    def mask(self, sae: "SAE", pre: Tensor, x_n: Tensor | None, *, training: bool,
             key_buffer: Tensor | None = None) -> Tensor | None:
        """Boolean keep-mask [N, d_sae] of ReLU pre-activations ``pre`` (None = keep all); no grad."""
        return None

    def reference_mask(self, sae: "SAE", pre: Tensor, x_n: Tensor) -> Tensor:
        raise NotImplementedError(f"rule {self.name!r} has no reference selection")

    def selection_pre_acts(self, sae: "SAE", x_n: Tensor) -> Tensor:
        """No-grad ReLU pre-activations [N, d_sae] the sparse training path selects from."""
        return sae._pre_acts_n(x_n)

    def sparse_ok(self, sae: "SAE") -> bool:
        """The training forward may take the sparse path (gathered selected latents)."""
        return True

    def sparse_select(self, sae: "SAE", pre: Tensor) -> tuple[Tensor, Tensor] | None:
        """(rows, cols) of the selected entries without a dense mask, or None to build the mask."""
        return None

    def activate(self, sae: "SAE", pre_g: Tensor, mask: Tensor | None) -> Tensor:
        """Activations with grad from pre-activations with grad ``pre_g`` and the keep-mask."""
        return pre_g if mask is None else pre_g * mask

    # ------------------------------------------------------------------ stitching
    state_names: tuple[str, ...] = ()
    """Per-latent tensors the rule registers on an SAE (copied by :meth:`SAE.from_affine`)."""
    stitched_as: str | None = None
    """The rule a stitched SAE of this rule uses (None: this one)."""

    def latent_state(self, sae: "SAE") -> dict[str, Tensor]:
        """Per-latent state of ``sae`` in the form of the ``stitched_as`` rule (concatenated by stitching)."""
        return {n: getattr(sae, n).detach() for n in self.state_names}

    def competing_keys(self, pre: Tensor, dec_norms: Tensor) -> Tensor:
        """The ranking keys of a competing selection (the latents with the largest keys win)."""
        return pre

    # ------------------------------------------------------------------ training
    def before_step(self, sae: "SAE") -> None:
        """Called at the start of each training forward (e.g. to project parameters)."""

    def loss(self, sae: "SAE", pre_g: Tensor | None, n: int) -> Tensor | None:
        """The rule's own weighted loss term (``SAEOutput.rule_loss``), or None."""
        return None

    def observe_l0(self, sae: "SAE", l0_tokens: Tensor) -> None:
        """Sees each forward's per-token L0 (speed hints)."""

    def after_step(self, sae: "SAE", kept: Tensor) -> None:
        """Training-time update from the kept activations (values of the selected entries)."""

    def calibrate(self, sae: "SAE", batches: list[Tensor]) -> float:
        """Re-estimate the inference threshold with the current weights (rules with ``calibrates``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ SAELens
    def to_saelens(self, sae: "SAE", w: dict[str, Tensor]) -> dict[str, Any]:
        """Extra SAELens config fields; may add tensors to the model-space weights ``w``."""
        return {}

    def from_saelens(self, lsae: Any, lcfg: Any, meta: dict) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """(SAEConfig fields, state tensors) this rule reads from an SAELens SAE."""
        return {}, {}

    def accepts_saelens(self, arch: str, lsae: Any) -> bool:
        """A SAELens SAE of architecture ``arch`` whose saelib metadata names this rule is this rule."""
        return arch == self.saelens_name

    def __repr__(self) -> str:
        return f"<rule {self.name}>"


def kept_min(kept: Tensor) -> Tensor | None:
    """Smallest positive entry of ``kept`` (None when there is none)."""
    pos = kept[kept > 0]
    return pos.min() if pos.numel() else None

