"""The claims made for batch normalization that the lab tests (``docs/design/CLAIMS.md``).

One entry per claim: its id, the claim in plain words, and the published anchor to print
beside our number. Experiments name the claims they test by id; the suite's index has one
row per claim.

>>> CLAIMS["C5"].words
'batch norm lowers sensitivity to the learning rate (allows higher rates)'
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CLAIMS", "Claim", "claim_order", "claim_words"]


@dataclass(frozen=True)
class Claim:
    id: str
    words: str
    anchor: str = ""


CLAIMS: dict[str, Claim] = {c.id: c for c in (
    Claim("C1", "batch norm makes training faster",
          "Ioffe & Szegedy 2015: BN-Inception reached Inception's 72.2% top-1 in about 14x fewer steps"),
    Claim("C2", "batch norm makes training more stable", ""),
    Claim("C3", "batch norm keeps each layer's input distribution steady (less internal covariate shift)",
          "Ioffe & Szegedy 2015 Fig. 1b,c; challenged by Santurkar et al. 2018"),
    Claim("C4", "batch norm lowers sensitivity to the initial weights", ""),
    Claim("C5", "batch norm lowers sensitivity to the learning rate (allows higher rates)",
          "Ioffe & Szegedy 2015: BN-Inception trained at 5x and 30x the base rate; Bjorck et al. 2018: "
          "the gain comes from the larger rates BN allows"),
    Claim("C6", "batch norm makes training less prone to overfitting",
          "Ioffe & Szegedy 2015: dropout could be removed from BN-Inception"),
    Claim("C7", "batch norm eases vanishing gradients", ""),
    Claim("C8", "at inference batch norm uses moving averages, so a prediction does not depend on the batch",
          "Wu & Johnson 2021: EMA vs population statistics"),
    # Extends C8: inference with test-batch statistics on purpose. "C8t" sorts beside C8 (claim_order).
    Claim("C8t", "batch norm statistics re-estimated on shifted test data recover accuracy (test-time adaptation)",
          "Schneider et al. 2020: ImageNet-C mCE 76.7 -> 62.2; Wang et al. 2021 (TENT): CIFAR-10-C severity 5 error "
          "43.5% -> 20.4% (test-batch statistics) -> 18.6% (TENT)"),
    Claim("C9", "batch norm costs extra memory and time",
          "In-Place ABN (Rota Bulo et al. 2018): up to 50% activation memory saved"),
    Claim("C10", "batch norm works less well with small batches",
          "Wu & He 2018: ResNet-50 error 34.7% (BN) vs 24.1% (GN) at batch 2"),
    Claim("C11", "batch norm is hard to use in recurrent networks",
          "Cooijmans et al. 2016: BN-LSTM converges faster on sequential MNIST"),
    Claim("C12", "layer, instance and group norm do not depend on the batch",
          "Ba et al. 2016; Ulyanov et al. 2016; Wu & He 2018"),
    Claim("C13", "batch norm can go before or after the activation", ""),
    Claim("C14", "batch norm works well with dropout (batch norm before dropout)",
          "Li et al. 2019: DenseNet CIFAR-100 77.42% without dropout vs 68.55% with dropout 0.5"),
    Claim("C15", "batch norm makes weight decay easier to use",
          "van Laarhoven 2017: with BN, L2 acts on the effective learning rate"),
    Claim("C16", "batch norm helps the network learn from augmented data",
          "Ioffe & Szegedy 2015 (Sec. 4.2.1): BN-Inception was trained with fewer photometric distortions, "
          "since it sees each example fewer times"),
    # Extensions: questions the text's claims leave out, each with an experiment (CLAIMS.md,
    # "Experiments that challenge or extend the claims"); ids X1, X2, ... after the claims.
    Claim("X1", "(extension) training only batch norm's gamma and beta, every other weight frozen at its random "
                "init, learns far more than chance",
          "Frankle et al. 2020: 82% on CIFAR-10 with a deep ResNet, training only BN"),
)}


def claim_words(claim_id: str) -> str:
    """``"C5: batch norm lowers ..."``; a ``ValueError`` lists the ids for an unknown one."""
    if claim_id not in CLAIMS:
        raise ValueError(f"unknown claim {claim_id!r}; the claims are {', '.join(CLAIMS)} (see CLAIMS.md).")
    return f"{claim_id}: {CLAIMS[claim_id].words}"


def claim_order(claim_id: str) -> tuple[str, int, str]:
    """A sort key that puts claims in the order of :data:`CLAIMS`: the claims (``C``) before the
    extensions (``X``), then by number, then suffix (``C8`` before ``C8t`` before ``C9``; ``C10``
    after ``C9``).

    >>> sorted(["X1", "C10", "C8t", "C9", "C8"], key=claim_order)
    ['C8', 'C8t', 'C9', 'C10', 'X1']
    """
    digits = "".join(ch for ch in claim_id[1:] if ch.isdigit())
    return claim_id[:1], int(digits or 0), claim_id[1 + len(digits):]
