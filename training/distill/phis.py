"""PHI-S: the teachers' features standardised by a PCA rotation and a Hadamard matrix (Ranzinger et al., RADIOv2.5).

For a teacher's features ``x`` (C channels) with mean ``mu`` and covariance ``U diag(lam) U^T``:

    z = H U^T (x - mu) / phi,    phi = sqrt(mean(lam)),    H a normalised C x C Hadamard matrix (entries +-1/sqrt C)

``H U^T`` is orthogonal, so the map is invertible (``x = phi U H^T z + mu``) and isotropic: every channel of ``z``
has variance exactly 1 (``diag(H diag(lam) H^T) = mean(lam)``), while a distance in ``z`` is a distance in ``x``
divided by one number. Per-channel standardisation would instead divide LiteMedSAM's near-dead channels (std 0.0003
against 0.155 for the largest) by their own tiny std and make the loss chase noise. The student learns ``z``; at
export the inverse is folded into each translator's last layer (:func:`fold_into`), so a bundle's translators give
the teacher's own features and every head reads them unchanged.

Hadamard matrices: Sylvester's construction for powers of two, Paley's construction I for q + 1 (q a prime,
q = 3 mod 4: 12, 20, 24, ...), and Kronecker products of the two (768 = 12 x 64, 384 = 12 x 32). Widths with none of
these get a seeded random orthogonal matrix (channels then equal in variance only approximately); the normaliser
says which it used.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, int(n ** 0.5) + 1))


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _paley(q: int) -> np.ndarray:
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q = 3 (mod 4)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if i in squares else -1 for i in range(1, q)])
    jacobsthal = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)])
    s = np.zeros((q + 1, q + 1))
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal
    return s + np.eye(q + 1)


def hadamard(n: int) -> np.ndarray | None:
    """An unnormalised n x n Hadamard matrix (entries +-1, ``H H^T = n I``), or None where none is built here."""
    for m in range(0, n.bit_length()):
        power = 1 << m
        if n % power:
            break
        rest = n // power
        if rest == 1:
            return _sylvester(n)
        if _is_prime(rest - 1) and (rest - 1) % 4 == 3:
            return np.kron(_paley(rest - 1), _sylvester(power))
    return None


def balanced_rotation(n: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """An orthogonal n x n matrix spreading variance evenly over channels: normalised Hadamard where one exists,
    else a seeded random orthogonal matrix; and which it is."""
    h = hadamard(n)
    if h is not None:
        return h / np.sqrt(n), "hadamard"
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r)), "random-orthogonal"


class PhiS(nn.Module):
    """One feature's normaliser: ``forward`` maps teacher features to the standardised space along ``dim`` (1 for
    (B, C, H, W) maps, -1 for (B, C) vectors), ``inverse`` back. ``kind`` "phi-s" or "identity"."""

    def __init__(self, channels: int, kind: str = "phi-s"):
        super().__init__()
        self.kind = kind
        self.register_buffer("mean", torch.zeros(channels, dtype=torch.float64))
        self.register_buffer("rotation", torch.eye(channels, dtype=torch.float64))  # z = R (x - mean) / scale
        self.register_buffer("scale", torch.ones((), dtype=torch.float64))

    @property
    def channels(self) -> int:
        return int(self.mean.numel())

    @torch.no_grad()
    def fit(self, samples: torch.Tensor, seed: int = 0) -> "PhiS":
        """Fit on (N, C) samples (feature vectors: pixels of dense maps or summary tokens)."""
        x = samples.detach().to(torch.float64)
        if x.ndim != 2 or x.shape[1] != self.channels:
            raise ValueError(f"PHI-S fits (N, {self.channels}) samples, got {tuple(x.shape)}")
        if self.kind == "identity":
            return self
        if x.shape[0] < 2:
            raise ValueError("PHI-S needs at least two samples")
        mean = x.mean(0)
        cov = torch.cov((x - mean).T) if x.shape[0] > 1 else torch.zeros(self.channels, self.channels)
        lam, u = torch.linalg.eigh(cov)
        lam = lam.clamp(min=0)
        h, how = balanced_rotation(self.channels, seed)
        self.rotation_kind = how
        self.mean.copy_(mean)
        self.rotation.copy_(torch.from_numpy(h) @ u.T)
        self.scale.copy_(lam.mean().sqrt().clamp(min=1e-12))
        return self

    def _rotate(self, x: torch.Tensor, matrix: torch.Tensor, dim: int) -> torch.Tensor:
        x = x.movedim(dim, -1)
        return (x @ matrix.T.to(x.dtype)).movedim(-1, dim)

    def forward(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[dim] = -1
        centred = x - self.mean.to(x.dtype).view(shape)
        return self._rotate(centred, self.rotation, dim) / self.scale.to(x.dtype)

    def inverse(self, z: torch.Tensor, dim: int = 1) -> torch.Tensor:
        shape = [1] * z.ndim
        shape[dim] = -1
        return self._rotate(z, self.rotation.T, dim) * self.scale.to(z.dtype) + self.mean.to(z.dtype).view(shape)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, c) with ``x = A z + c``: the inverse as one affine map (float64)."""
        return self.rotation.T * self.scale, self.mean.clone()


@torch.no_grad()
def fold_into(layer: nn.Module, normaliser: PhiS) -> None:
    """Make ``layer`` (a Linear, or a 1x1 Conv2d) output ``inverse(layer(h))`` instead of ``layer(h)``: W <- A W,
    b <- A b + c. After this the translator predicts the teacher's features themselves."""
    a, c = normaliser.affine()
    weight = layer.weight.detach().to(torch.float64)
    if isinstance(layer, nn.Conv2d):
        if layer.kernel_size != (1, 1):
            raise ValueError("only a 1x1 convolution can absorb the inverse normalisation")
        w2 = weight[:, :, 0, 0]
    elif isinstance(layer, nn.Linear):
        w2 = weight
    else:
        raise TypeError(f"cannot fold a normaliser into {type(layer).__name__}")
    bias = layer.bias.detach().to(torch.float64) if layer.bias is not None else torch.zeros(w2.shape[0],
                                                                                        dtype=torch.float64)
    new_w, new_b = a @ w2, a @ bias + c
    if isinstance(layer, nn.Conv2d):
        new_w = new_w[:, :, None, None]
    layer.weight.copy_(new_w.to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b.to(layer.weight.dtype))
    else:
        layer.bias.copy_(new_b.to(layer.bias.dtype))
