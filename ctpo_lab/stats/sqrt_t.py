"""The √t law of the cumulative log-ratio: the fixed-exponent σ̂ and a free exponent with a cluster bootstrap.

Under μ the cumulative log-ratio L_t = Σ_{k≤t} ℓ_k (ℓ_k = log π − log μ of the k-th valid token) is a
martingale plus a drift: L_t = M_t − K_t with E L_t = −Σ_{k≤t} E KL(μ‖π)(s_k).  When the increments of M are
i.i.d. with variance σ², sd(L_t) = σ·√t; a free fit sd(L_t) ≈ c·t^β then has β = 0.5, and β > 0.5 reveals
persistent (correlated) increments, e.g. a latent mode or prompts with different drifts pooled together.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from ctpo_lab import diagnostics
from ctpo_lab.stats.bootstrap import percentile_interval
from ctpo_lab.stats.inputs import ArrayLike, check_confidence, check_positive_int, group_index, matrix_and_mask
from ctpo_lab.stats.positions import PositionTable, group_centering, profile_table

__all__ = ["SqrtTFit", "fixed_exponent_sigma", "sqrt_t_fit"]


def _compact(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-index each row by valid-token position: out[i, t−1] = value at the t-th valid token ([N, T_max])."""
    pos = np.cumsum(mask, axis=1)
    t_max = int(pos[:, -1].max()) if pos.size else 0
    out = np.zeros((values.shape[0], max(t_max, 1)))
    alive = np.zeros_like(out, dtype=bool)
    rows, cols = np.nonzero(mask)
    out[rows, pos[rows, cols] - 1] = values[rows, cols]
    alive[rows, pos[rows, cols] - 1] = True
    return out, alive


def _wls_origin(t: np.ndarray, y: np.ndarray, w: np.ndarray, exponent: float) -> float:
    """argmin_σ Σ w (y − σ t^p)² = Σ w t^p y / Σ w t^{2p}."""
    tp = t**exponent
    den = float(np.sum(w * tp * tp))
    return float(np.sum(w * tp * y) / den) if den > 0 else math.nan


def fixed_exponent_sigma(
    profile: diagnostics.PositionProfile | PositionTable,
    *,
    exponent: float = 0.5,
    min_count: int = 30,
    max_position: int | None = 5000,
) -> float:
    """The paper's fixed-exponent fit: σ̂ = Σ_b w_b t_b^p y_b / Σ_b w_b t_b^{2p}.

    y_b = std of L_t in bin b, t_b the bin centre, w_b = √count_b; bins with < ``min_count`` tokens or a centre
    beyond ``max_position`` are dropped (Figure 1: bins of 50, ≥ 30 tokens, positions ≤ 5000, p = 0.5).
    Returns NaN when no bin qualifies.
    """
    table = profile if isinstance(profile, PositionTable) else profile_table(profile, 1)
    keep = table.count >= min_count
    if max_position is not None:
        keep &= table.bin_center <= max_position
    if not keep.any():
        return math.nan
    return _wls_origin(table.bin_center[keep], table.std[keep], np.sqrt(table.count[keep]), exponent)


# ----------------------------------------------------------------------------------------------------------
# the √t fit
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SqrtTFit:
    """Result of :func:`sqrt_t_fit`.

    sigma_hat : the paper's σ̂ (sd(L_t) ≈ σ̂·t^fixed_exponent), WLS through the origin on binned stds.
    sigma_hat_ci : cluster-bootstrap percentile CI of σ̂.
    exponent : free log-log slope β of sd(L_t) ≈ c·t^β on the log-spaced position grid.
    exponent_ci : cluster-bootstrap percentile CI (low, high) of β.
    prefactor : c of the free fit.
    grid_t, grid_sd, grid_count : the grid positions, sd(L_t) there (ddof 1; pooled within groups when centred)
        and the number of sequences alive there.
    bin_center, bin_std, bin_count : the binned profile used for σ̂ (bins with < min_count tokens are NaN).
    """

    sigma_hat: float
    sigma_hat_ci: tuple[float, float]
    exponent: float
    exponent_ci: tuple[float, float]
    prefactor: float
    fixed_exponent: float
    confidence: float
    n_boot: int
    n_sequences: int
    n_clusters: int
    cluster: str
    centered: bool
    grid_t: np.ndarray = field(repr=False)
    grid_sd: np.ndarray = field(repr=False)
    grid_count: np.ndarray = field(repr=False)
    bin_center: np.ndarray = field(repr=False)
    bin_std: np.ndarray = field(repr=False)
    bin_count: np.ndarray = field(repr=False)

    def contains(self, exponent: float = 0.5) -> bool:
        """Whether the exponent CI contains ``exponent``."""
        return bool(self.exponent_ci[0] <= exponent <= self.exponent_ci[1])

    def fixed_curve(self, t: ArrayLike) -> np.ndarray:
        """σ̂·t^p."""
        return self.sigma_hat * np.asarray(t, dtype=np.float64) ** self.fixed_exponent

    def free_curve(self, t: ArrayLike) -> np.ndarray:
        """c·t^β."""
        return self.prefactor * np.asarray(t, dtype=np.float64) ** self.exponent

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, np.ndarray):
                d[k] = [None if not np.isfinite(e) else float(e) for e in v.astype(np.float64)]
            elif isinstance(v, tuple):
                d[k] = [float(e) for e in v]
        return d


def _log_grid(t_lo: int, t_hi: int, size: int) -> np.ndarray:
    if t_hi <= t_lo:
        return np.array([t_lo], dtype=np.int64)
    return np.unique(np.round(np.geomspace(t_lo, t_hi, size)).astype(np.int64))


def _slope(log_t: np.ndarray, log_sd: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted LS slope/intercept along the last axis; NaN entries of log_sd are dropped per row."""
    ok = np.isfinite(log_sd) & (w > 0)
    w = np.where(ok, w, 0.0)
    y = np.where(ok, log_sd, 0.0)
    sw = w.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        xm = (w * log_t).sum(-1) / sw
        ym = (w * y).sum(-1) / sw
        dx = log_t - xm[..., None]
        sxx = (w * dx * dx).sum(-1)
        beta = (w * dx * (y - ym[..., None])).sum(-1) / sxx
        enough = ok.sum(-1) >= 3
        beta = np.where(enough, beta, np.nan)
        alpha = np.where(enough, ym - beta * xm, np.nan)
    return beta, alpha


def sqrt_t_fit(
    cum_log_ratio: ArrayLike,
    mask: ArrayLike,
    groups: ArrayLike | None = None,
    *,
    cluster: Literal["auto", "group", "sequence"] = "auto",
    center: bool = False,
    fixed_exponent: float = 0.5,
    bin_width: int = 50,
    min_count: int = 30,
    min_sequences: int | None = None,
    max_position: int | None = 5000,
    min_position: int = 1,
    grid_size: int = 16,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> SqrtTFit:
    """Test the √t law of the cumulative log-ratio: sd(L_t) ∝ t^β with β = 0.5 under i.i.d. increments.

    Two fits on the same data:

    * the paper's fixed-exponent fit σ̂ = Σ_b w_b √t_b y_b / Σ_b w_b t_b (y_b the std of L_t in bins of
      ``bin_width`` positions, w_b = √count_b, bins with < ``min_count`` tokens and centres > ``max_position``
      dropped);
    * a free exponent: weighted least squares of log sd(L_t) on log t over a log-spaced grid of positions
      t ∈ [min_position, t_max] (t_max: the last position with ≥ ``min_count`` alive sequences), with weights
      n_t − 1; sd(L_t) is the ddof-1 sd over sequences alive at t (or, with ``center``, the pooled
      within-group sd, Σ_g Σ_i (L_it − m_gt)² / Σ_g (n_gt − 1)).

    The CIs of both come from a cluster bootstrap: clusters (prompt groups or sequences) are resampled with
    replacement and the fits recomputed from per-cluster sufficient statistics (percentile intervals).

    Parameters
    ----------
    cum_log_ratio : Tensor or array [N, T]
        L_t per token (e.g. :func:`ctpo_lab.ratios.cumulative_log_ratio`); masked-out values are ignored.
    mask : Tensor or array [N, T], bool or 0/1
        Valid tokens (alive positions); t counts valid tokens only.
    groups : array [N], optional
        Prompt-group id of each row (any hashable labels).
    cluster : {"auto", "group", "sequence"}
        Bootstrap unit; ``auto`` = groups when given, else sequences.
    center : bool
        Centre L_t within groups before the fits (needs ``groups``).
    fixed_exponent : float
        The exponent of the σ̂ fit (the paper's 0.5).
    bin_width, min_count, max_position : the binning of the σ̂ fit (Figure 1: 50, 30, 5000).
    min_sequences : grid positions with fewer alive sequences are dropped (default: ``min_count``).
    min_position, grid_size : the free-exponent grid.
    n_boot, confidence, seed : the bootstrap.

    Returns
    -------
    SqrtTFit

    Raises
    ------
    ValueError
        Bad shapes/values, NaN or inf on valid tokens, fewer than 2 clusters, or fewer than 3 grid positions
        with ≥ ``min_count`` sequences.
    """
    x, m = matrix_and_mask(cum_log_ratio, mask)
    n_seq = x.shape[0]
    g = group_index(groups, n_seq)
    if cluster not in ("auto", "group", "sequence"):
        raise ValueError(f"cluster: expected 'auto', 'group' or 'sequence', got {cluster!r}")
    if cluster == "group" and g is None:
        raise ValueError("groups: cluster='group' needs groups")
    if center and g is None:
        raise ValueError("groups: center=True needs groups (one prompt-group id per row)")
    bin_width = check_positive_int(bin_width, "bin_width")
    min_count = check_positive_int(min_count, "min_count", 2)
    min_seq = min_count if min_sequences is None else check_positive_int(min_sequences, "min_sequences", 2)
    min_position = check_positive_int(min_position, "min_position")
    grid_size = check_positive_int(grid_size, "grid_size", 3)
    n_boot = check_positive_int(n_boot, "n_boot")
    confidence = check_confidence(confidence)
    if max_position is not None:
        max_position = check_positive_int(max_position, "max_position")
    if not math.isfinite(fixed_exponent):
        raise ValueError(f"fixed_exponent: expected a finite number, got {fixed_exponent!r}")
    use_group = cluster == "group" or (cluster == "auto" and g is not None)
    cid = g if use_group else np.arange(n_seq)
    assert cid is not None
    n_clusters = int(cid.max()) + 1 if n_seq else 0
    if n_clusters < 2:
        raise ValueError(f"cum_log_ratio: need at least 2 clusters ({'groups' if use_group else 'sequences'})")

    if center:
        assert g is not None
        vals, n_tok = group_centering(x, m, g)  # [N, T]
        m_bins = m & (n_tok >= 2)  # the σ̂ bins use ddof-corrected centred values of groups with ≥ 2 alive
        vals_bins = np.where(m_bins, vals * np.sqrt(n_tok / np.maximum(n_tok - 1.0, 1.0)), 0.0)
    else:
        vals, m_bins, vals_bins = x, m, x
    comp, alive = _compact(vals, m)  # [N, T_max]
    n_alive = alive.sum(0)  # [T_max]

    # --- free exponent on the log grid: per-cluster sufficient statistics at the grid positions
    ok_pos = np.nonzero(n_alive >= min_seq)[0] + 1
    if max_position is not None:
        ok_pos = ok_pos[ok_pos <= max_position]
    ok_pos = ok_pos[ok_pos >= min_position]
    if ok_pos.size == 0:
        raise ValueError(f"mask: no position ≥ {min_position} has {min_seq} or more alive sequences")
    grid = _log_grid(int(ok_pos.min()), int(ok_pos.max()), grid_size)
    grid = grid[n_alive[grid - 1] >= min_seq]
    if grid.size < 3:
        raise ValueError(
            f"mask: only {grid.size} grid position(s) with ≥ {min_seq} alive sequences; need 3 (lower "
            "min_sequences or supply longer/more sequences)"
        )
    a = alive[:, grid - 1].astype(np.float64)  # [N, K]
    v = comp[:, grid - 1] * a
    C = np.zeros((n_clusters, grid.size))
    c_n, c_s, c_ss = C.copy(), C.copy(), C.copy()
    np.add.at(c_n, cid, a)
    if center:
        # pooled within-group variance: numerator Σ (L − m_g)², denominator Σ (n_g − 1) spread over members
        assert g is not None
        n_g = np.zeros((int(g.max()) + 1, grid.size))
        np.add.at(n_g, g, a)
        df_i = np.where(a > 0, (n_g[g] - 1.0) / np.maximum(n_g[g], 1.0), 0.0)
        np.add.at(c_s, cid, df_i)  # c_s: degrees of freedom
        np.add.at(c_ss, cid, v * v)

        def grid_var(n: np.ndarray, s: np.ndarray, ss: np.ndarray) -> np.ndarray:
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(s > 0.5, ss / s, np.nan)
    else:
        np.add.at(c_s, cid, v)
        np.add.at(c_ss, cid, v * v)

        def grid_var(n: np.ndarray, s: np.ndarray, ss: np.ndarray) -> np.ndarray:
            with np.errstate(invalid="ignore", divide="ignore"):
                var = (ss - s * s / n) / (n - 1.0)
            return np.where(n >= 2, np.maximum(var, 0.0), np.nan)

    log_t = np.log(grid.astype(np.float64))

    def free_fit(n: np.ndarray, s: np.ndarray, ss: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        var = grid_var(n, s, ss)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_sd = 0.5 * np.log(var)
        log_sd = np.where(np.isfinite(log_sd), log_sd, np.nan)
        beta, alpha = _slope(log_t, log_sd, np.maximum(n - 1.0, 0.0))
        return beta, alpha, np.sqrt(var)

    beta, alpha, grid_sd = free_fit(c_n.sum(0), c_s.sum(0), c_ss.sum(0))

    # --- σ̂ on bins of positions: per-cluster bin sums (the pooled sums equal diagnostics.position_profile's)
    pos = np.cumsum(m, axis=1)  # positions count every valid token
    rows, cols = np.nonzero(m_bins)
    b_idx = (pos[rows, cols] - 1) // bin_width
    n_bins = max(1, -(-x.shape[1] // bin_width))
    bn, bs, bss = (np.zeros((n_clusters, n_bins)) for _ in range(3))
    np.add.at(bn, (cid[rows], b_idx), 1.0)
    np.add.at(bs, (cid[rows], b_idx), vals_bins[rows, cols])
    np.add.at(bss, (cid[rows], b_idx), vals_bins[rows, cols] ** 2)
    centers = np.arange(n_bins) * bin_width + 1 + (bin_width - 1) / 2
    in_range = np.ones(n_bins, dtype=bool) if max_position is None else centers <= max_position
    tp = centers**fixed_exponent

    def sigma_fit(n_b: np.ndarray, s_b: np.ndarray, ss_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_b = s_b / n_b
            std_b = np.sqrt(np.maximum(ss_b / n_b - mean_b**2, 0.0))
            keep = (n_b >= min_count) & in_range
            w = np.where(keep, np.sqrt(n_b), 0.0)
            sig = (w * tp * np.where(keep, std_b, 0.0)).sum(-1) / (w * tp * tp).sum(-1)
        return sig, np.where(n_b >= min_count, std_b, np.nan)

    sigma, bin_std = sigma_fit(bn.sum(0), bs.sum(0), bss.sum(0))

    # --- cluster bootstrap (multinomial cluster weights; replicates in chunks to bound memory)
    rng = np.random.default_rng(seed)
    betas, sigmas = np.empty(n_boot), np.empty(n_boot)
    chunk = max(1, min(n_boot, 2_000_000 // max(1, n_clusters * (grid.size + n_bins))))
    done = 0
    while done < n_boot:
        k = min(chunk, n_boot - done)
        W = rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=k).astype(np.float64)
        b_beta, _, _ = free_fit(W @ c_n, W @ c_s, W @ c_ss)
        betas[done:done + k] = b_beta
        sigmas[done:done + k] = sigma_fit(W @ bn, W @ bs, W @ bss)[0]
        done += k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        e_lo, e_hi = (percentile_interval(betas, confidence) if np.isfinite(betas).any() else (math.nan, math.nan))
        s_lo, s_hi = (percentile_interval(sigmas, confidence) if np.isfinite(sigmas).any()
                      else (math.nan, math.nan))
    return SqrtTFit(
        sigma_hat=float(sigma),
        sigma_hat_ci=(float(s_lo), float(s_hi)),
        exponent=float(beta),
        exponent_ci=(float(e_lo), float(e_hi)),
        prefactor=float(np.exp(alpha)),
        fixed_exponent=float(fixed_exponent),
        confidence=confidence,
        n_boot=n_boot,
        n_sequences=n_seq,
        n_clusters=n_clusters,
        cluster="group" if use_group else "sequence",
        centered=bool(center),
        grid_t=grid,
        grid_sd=grid_sd,
        grid_count=c_n.sum(0),
        bin_center=centers,
        bin_std=bin_std,
        bin_count=bn.sum(0),
    )


