"""Compute-optimal model size and tokens for a compute budget: Chinchilla (Hoffmann et al. 2022) and Kaplan et al.
(2020), side by side.

Both laws were fitted on dense decoder-only transformers with C = 6 N D training FLOPs (N parameters, D tokens).
For a Mixture-of-Experts model the planner applies them to the active parameters per token, the N that sets the
FLOPs; that is an extrapolation (neither paper trained sparse models), and says nothing of how the inactive
experts' capacity changes the loss.

- Chinchilla, approach 3 (section 3.3): L(N, D) = E + A / N^alpha + B / D^beta, E = 1.69, A = 406.4, B = 410.7,
  alpha = 0.34, beta = 0.28 (N counts all parameters, embeddings included); minimising L under C = 6 N D gives
  N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b with a = beta / (alpha + beta), b = alpha / (alpha + beta),
  G = (alpha A / (beta B))^(1 / (alpha + beta)) (their equation 4). With these rounded constants it predicts about
  half the parameters of approaches 1 and 2 at the same compute.
- Chinchilla, approaches 1 and 2 (Table 3): about 20 tokens per parameter, so N = sqrt(C / 120), D = 20 N.
- Kaplan et al., equations 1.1-1.3: L(N) = (N_c / N)^alpha_N, L(D) = (D_c / D)^alpha_D,
  L(C_min) = (C_c^min / C_min)^alpha_C^min with N the non-embedding parameters, D tokens and C_min in PF-days
  (1 PF-day = 8.64e19 FLOPs); and the compute-efficient allocation of their Table 6,
  N_opt = 1.3e9 * C_min^0.73 non-embedding parameters, for which the planner takes D = C / (6 N_opt) tokens (their
  Table 6 lists D_opt = 2e10 * C_min^0.27 for one epoch, which is not consistent with C = 6 N D by a factor of 2).
Kaplan's losses are in nats per token of WebText2 with GPT-2's tokenizer, Chinchilla's of MassiveText with
SentencePiece: the two are not comparable with each other, nor with this project's validation loss.
"""

from __future__ import annotations

from dataclasses import dataclass

PF_DAY = 1e15 * 86400  # FLOPs in one petaflop/s-day

# Hoffmann et al. 2022, section 3.3 (approach 3)
CHINCHILLA_E, CHINCHILLA_A, CHINCHILLA_B = 1.69, 406.4, 410.7
CHINCHILLA_ALPHA, CHINCHILLA_BETA = 0.34, 0.28
CHINCHILLA_TOKENS_PER_PARAM = 20.0  # approaches 1 and 2, Table 3

# Kaplan et al. 2020, Table 5 (equations 1.1-1.3) and Table 6
KAPLAN_N_C, KAPLAN_ALPHA_N = 8.8e13, 0.076
KAPLAN_D_C, KAPLAN_ALPHA_D = 5.4e13, 0.095
KAPLAN_C_MIN_C, KAPLAN_ALPHA_C_MIN = 3.1e8, 0.050  # PF-days
KAPLAN_N_E, KAPLAN_P_N = 1.3e9, 0.73  # Table 6: N_opt = N_e * C_min^p_N, C_min in PF-days


@dataclass
class Allocation:
    """A compute budget split into a model size and a number of training tokens by one law."""

    law: str
    params: float
    tokens: float
    loss: float | None  # the law's predicted loss at that allocation (its own units), None where it has none


def chinchilla_exponents() -> tuple[float, float, float]:
    """(a, b, G) of Hoffmann et al.'s equation 4."""
    total = CHINCHILLA_ALPHA + CHINCHILLA_BETA
    g = (CHINCHILLA_ALPHA * CHINCHILLA_A / (CHINCHILLA_BETA * CHINCHILLA_B)) ** (1 / total)
    return CHINCHILLA_BETA / total, CHINCHILLA_ALPHA / total, g


def chinchilla_loss(params: float, tokens: float) -> float:
    """Approach 3's fitted loss L(N, D)."""
    return CHINCHILLA_E + CHINCHILLA_A / params**CHINCHILLA_ALPHA + CHINCHILLA_B / tokens**CHINCHILLA_BETA


def chinchilla_optimal(flops: float) -> Allocation:
    """Approach 3's compute-optimal N and D for C = flops (C = 6 N D)."""
    a, b, g = chinchilla_exponents()
    params, tokens = g * (flops / 6) ** a, (flops / 6) ** b / g
    return Allocation("Chinchilla approach 3", params, tokens, chinchilla_loss(params, tokens))


def chinchilla_20_tokens(flops: float) -> Allocation:
    """Approaches 1 and 2 as the 20-tokens-per-parameter rule: 6 N (20 N) = C."""
    params = (flops / (6 * CHINCHILLA_TOKENS_PER_PARAM)) ** 0.5
    tokens = CHINCHILLA_TOKENS_PER_PARAM * params
    return Allocation("Chinchilla ~20 tokens/param", params, tokens, chinchilla_loss(params, tokens))


def kaplan_loss_n(non_embedding_params: float) -> float:
    """Equation 1.1: loss of a model of N non-embedding parameters trained to convergence."""
    return (KAPLAN_N_C / non_embedding_params) ** KAPLAN_ALPHA_N


def kaplan_loss_d(tokens: float) -> float:
    """Equation 1.2: loss of a large model trained on D tokens with early stopping."""
    return (KAPLAN_D_C / tokens) ** KAPLAN_ALPHA_D


def kaplan_loss_c(flops: float) -> float:
    """Equation 1.3: loss at the compute-efficient frontier for C_min = flops (converted to PF-days)."""
    return (KAPLAN_C_MIN_C / (flops / PF_DAY)) ** KAPLAN_ALPHA_C_MIN


def kaplan_optimal(flops: float) -> Allocation:
    """Table 6's compute-efficient model size (non-embedding parameters), D = C / (6 N)."""
    params = KAPLAN_N_E * (flops / PF_DAY) ** KAPLAN_P_N
    return Allocation("Kaplan et al. 2020", params, flops / (6 * params), kaplan_loss_c(flops))


def optimal_allocations(flops: float) -> list[Allocation]:
    return [chinchilla_optimal(flops), chinchilla_20_tokens(flops), kaplan_optimal(flops)]


def optimal_tokens_for_size(params: float, non_embedding_params: float) -> dict[str, float]:
    """The training tokens each law calls compute-optimal for a model of this size (inverting the allocations)."""
    a, _, g = chinchilla_exponents()
    chinchilla_flops = 6 * (params / g) ** (1 / a)
    kaplan_flops = (non_embedding_params / KAPLAN_N_E) ** (1 / KAPLAN_P_N) * PF_DAY
    return {"Chinchilla approach 3": chinchilla_flops / (6 * params),
            "Chinchilla ~20 tokens/param": CHINCHILLA_TOKENS_PER_PARAM * params,
            "Kaplan et al. 2020": kaplan_flops / (6 * non_embedding_params)}
