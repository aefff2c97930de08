"""One colour and one label per estimator / loss preset, shared by every figure."""

from __future__ import annotations

#: Ratio family (:data:`ctpo_lab.ratios.RATIO_FAMILIES`, used for weight profiles) or estimator = preset of
#: :data:`ctpo_lab.losses.PRESETS` → matplotlib colour. A bare-weight preset (``unclipped_*``, ``tis``,
#: ``cumulative_tis``) has its family's colour, and so does the family's canonical clipped loss (``grpo``
#: token, ``ctpo`` cumulative, ``gspo`` sequence geo-mean, ``seq_is`` sequence): figures that show both tell
#: them apart by marker or line style.
ESTIMATOR_COLORS: dict[str, str] = {
    "token": "#1f77b4",
    "grpo": "#1f77b4",
    "dapo": "#aec7e8",
    "sequence": "#7f7f7f",
    "seq_is": "#7f7f7f",
    "gspo": "#2ca02c",
    "sequence_geomean": "#2ca02c",
    "cumulative": "#d62728",
    "ctpo": "#d62728",
    "ctpo_fixed": "#ff9896",
    "cumulative_geomean": "#9467bd",
    "ctpo_geomean": "#9467bd",
    "truncated_cumulative": "#ff7f0e",
    "token_tis": "#8c564b",
    "cispo": "#8c564b",
    "fixed_window": "#1f77b4",
    "sqrt_t_window": "#d62728",
    "unclipped_token": "#1f77b4",
    "unclipped_cumulative": "#d62728",
    "unclipped_sequence": "#7f7f7f",
    "unclipped_sequence_geomean": "#2ca02c",
    "unclipped_cumulative_geomean": "#9467bd",
    "tis": "#8c564b",
    "cumulative_tis": "#ff7f0e",
}

_LABELS: dict[str, str] = {
    "token": "token ratio r_t",
    "grpo": "GRPO",
    "dapo": "DAPO",
    "sequence": "sequence ratio ρ_1:T",
    "seq_is": "sequence IS",
    "gspo": "GSPO",
    "sequence_geomean": "sequence geo-mean",
    "cumulative": "cumulative ratio ρ_1:t",
    "ctpo": "CTPO (√t window)",
    "ctpo_fixed": "CTPO (fixed window)",
    "cumulative_geomean": "cumulative geo-mean",
    "ctpo_geomean": "CTPO geo-mean",
    "truncated_cumulative": "truncated cumulative",
    "token_tis": "token TIS",
    "cispo": "CISPO",
    "sapo": "SAPO",
    "gmpo": "GMPO",
    "dr_grpo": "Dr. GRPO",
    "bnpo": "BNPO",
    "gppo": "GPPO",
    "topr": "TOPR",
    "dppo_tv": "DPPO (TV)",
    "dppo_kl": "DPPO (KL)",
    "fixed_window": "fixed window [0.5, 5]",
    "sqrt_t_window": "√t window (0.025/0.05)",
    "unclipped_token": "token IS r_t (unclipped)",
    "unclipped_cumulative": "cumulative IS ρ_1:t (unclipped)",
    "unclipped_sequence": "sequence IS ρ_1:T (unclipped)",
    "unclipped_sequence_geomean": "sequence geo-mean (unclipped)",
    "unclipped_cumulative_geomean": "cumulative geo-mean (unclipped)",
    "tis": "token TIS min(r_t, 2)",
    "cumulative_tis": "cumulative TIS Π min(r_k, 1)",
}


def estimator_color(name: str) -> str:
    """Colour of an estimator or preset (a neutral grey-blue for unknown names)."""
    return ESTIMATOR_COLORS.get(name, "#333333")


def estimator_label(name: str) -> str:
    """Human-readable legend label of an estimator or preset."""
    return _LABELS.get(name, name)
