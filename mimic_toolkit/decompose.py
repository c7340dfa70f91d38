"""Concept dictionaries for hidden states Z [N, D] (as XL-VLMs / CoX-LMM build them),
the assignment problem and purity. Plain torch, deterministic for a given seed.

Every method gives K concept vectors in feature space and an activation of each concept for any
sample:
- `snmf`: semi-NMF, Z ~ U V with non-negative, L1-penalised codes U and unit-norm atoms V;
- `kmeans`: centroids; activation 1 / (1 + distance);
- `pca`: principal directions of the centred data; activation = projection;
- `simple`: the K samples of largest norm as centroids; activation 1 / (1 + distance).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError

METHODS = ("snmf", "kmeans", "pca", "simple")


@dataclass
class Decomposition:
    method: str
    vectors: torch.Tensor  # [K, D] concept vectors
    mean: torch.Tensor  # [D] mean of the fitted rows
    sparsity: float = 0.0  # snmf: the L1 weight, relative to the mean row norm

    @property
    def k(self) -> int:
        return self.vectors.shape[0]

    def activations(self, rows: torch.Tensor) -> torch.Tensor:
        """How strongly each concept is present in each row, [N, K]."""
        rows = rows.float()
        if self.method == "snmf":
            return snmf_codes(rows, self.vectors, self.sparsity * float(self.mean.norm()))
        if self.method == "pca":
            return (rows - self.mean) @ self.vectors.T
        return 1 / (1 + torch.cdist(rows, self.vectors))

    def direction(self, k: int) -> torch.Tensor:
        """The unit direction of concept k in feature space (PCA components are directions
        already; other concepts are points, taken relative to the mean of the data)."""
        vector = self.vectors[k] if self.method in ("pca", "snmf") else self.vectors[k] - self.mean
        return vector / vector.norm().clamp_min(1e-12)


def fit(rows: torch.Tensor, method: str, k: int, *, seed: int = 0, sparsity: float = 0.1,
        iterations: int = 200) -> Decomposition:
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, not '{method}'")
    n = rows.shape[0]
    if k < 1:
        raise UserError(f"K must be at least 1, not {k}")
    if k > n:
        raise UserError(f"K={k} concepts need at least {k} samples; the features have {n} rows")
    rows = rows.float()
    mean = rows.mean(0)
    if method == "kmeans":
        vectors = kmeans(rows, k, seed=seed, iterations=iterations)
    elif method == "simple":
        vectors = rows[rows.norm(dim=1).topk(k).indices]
    elif method == "pca":
        vectors = pca(rows, k)
    else:
        vectors = snmf(rows, k, sparsity * float(mean.norm()), seed=seed, iterations=iterations)[1]
    return Decomposition(method, vectors, mean, sparsity if method == "snmf" else 0.0)


# -- k-means -------------------------------------------------------------------------------------
def kmeans(rows: torch.Tensor, k: int, *, seed: int = 0, iterations: int = 200, restarts: int = 4) -> torch.Tensor:
    """Lloyd's algorithm from k-means++ seeds; the best of `restarts` runs. Returns [k, D]."""
    generator = torch.Generator().manual_seed(seed)
    best, best_inertia = None, float("inf")
    for _ in range(restarts):
        centroids = _kmeans_plus_plus(rows, k, generator)
        for _ in range(iterations):
            assign = torch.cdist(rows, centroids).argmin(1)
            sizes = torch.bincount(assign, minlength=k)
            updated = torch.zeros_like(centroids).index_add_(0, assign, rows) / sizes.clamp_min(1)[:, None]
            for j in (sizes == 0).nonzero().flatten().tolist():  # an empty cluster takes the worst-fitted row
                updated[j] = rows[int((rows - centroids[assign]).norm(dim=1).argmax())]
            if torch.equal(updated, centroids):
                break
            centroids = updated
        inertia = float(torch.cdist(rows, centroids).min(1).values.pow(2).sum())
        if inertia < best_inertia:
            best, best_inertia = centroids, inertia
    return best


def _kmeans_plus_plus(rows, k, generator) -> torch.Tensor:
    chosen = [int(torch.randint(len(rows), (1,), generator=generator))]
    for _ in range(k - 1):
        distance = torch.cdist(rows, rows[chosen]).min(1).values.pow(2).double()
        if distance.sum() <= 0:  # fewer distinct rows than k: repeat one
            chosen.append(chosen[0])
            continue
        chosen.append(int(torch.multinomial(distance / distance.sum(), 1, generator=generator)))
    return rows[chosen].clone()


# -- PCA -----------------------------------------------------------------------------------------
def pca(rows: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k principal directions [k, D], each signed so its largest projection is positive."""
    centred = (rows - rows.mean(0)).double()
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:k]
    projections = centred @ components.T
    signs = projections.gather(0, projections.abs().argmax(0, keepdim=True)).sign().clamp_min(0) * 2 - 1
    components = components * signs.T
    if components.shape[0] < k:  # rank-deficient data: pad with zero directions
        components = torch.cat([components, components.new_zeros(k - components.shape[0], rows.shape[1])])
    return components.float()


# -- semi-NMF --------------------------------------------------------------------------------------
def snmf(rows: torch.Tensor, k: int, l1: float, *, seed: int = 0, iterations: int = 200):
    """min 0.5 ||Z - U V||^2 + l1 * sum(U), U >= 0, rows of V unit-norm. Alternates non-negative
    lasso steps for U with least squares for V (then rescaled), starting from k-means.
    Returns (U [N, k], V [k, D])."""
    atoms = kmeans(rows, k, seed=seed, iterations=50)
    atoms = atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1e-12)
    codes = snmf_codes(rows, atoms, l1)
    for _ in range(iterations):
        gram = (codes.T @ codes).double() + 1e-6 * torch.eye(k, dtype=torch.float64)
        atoms = torch.linalg.solve(gram, (codes.T @ rows).double()).float()
        unused = codes.sum(0) <= 0
        if unused.any():  # a dead atom restarts at the worst-explained row
            residual = (rows - codes @ atoms).norm(dim=1)
            atoms[unused] = rows[residual.topk(int(unused.sum())).indices]
        norms = atoms.norm(dim=1, keepdim=True).clamp_min(1e-12)
        atoms, codes = atoms / norms, codes * norms.T
        previous = codes
        codes = snmf_codes(rows, atoms, l1, start=codes, steps=20)
        if (codes - previous).abs().max() <= 1e-5 * (previous.abs().max() + 1e-12):
            break
    return codes, atoms


def snmf_codes(rows: torch.Tensor, atoms: torch.Tensor, l1: float, *, start: torch.Tensor | None = None,
               steps: int = 200) -> torch.Tensor:
    """Non-negative L1-penalised codes for fixed atoms: projected ISTA, [N, k]."""
    gram = atoms @ atoms.T
    step = 1.0 / max(float(torch.linalg.matrix_norm(gram, ord=2)), 1e-12)
    target = rows @ atoms.T
    codes = target.clamp_min(0) if start is None else start.clone()
    for _ in range(steps):
        codes = (codes - step * (codes @ gram - target + l1)).clamp_min(0)
    return codes


# -- assignment and purity ---------------------------------------------------------------------------
def hungarian(cost: torch.Tensor) -> list[tuple[int, int]]:
    """The assignment of rows to distinct columns with the least total cost (Kuhn-Munkres with
    potentials, O(n^2 m)); a rectangular matrix assigns every row of its shorter side.
    Returns (row, column) pairs sorted by row."""
    matrix = cost.double().tolist()
    transposed = len(matrix) > len(matrix[0])
    if transposed:
        matrix = [list(column) for column in zip(*matrix)]
    n, m = len(matrix), len(matrix[0])
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)
    owner = [0] * (m + 1)  # owner[j]: the row (1-based) holding column j; column 0 is a sentinel
    way = [0] * (m + 1)
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        slack, used = [inf] * (m + 1), [False] * (m + 1)
        while True:  # grow an alternating tree from row i until it reaches a free column
            used[j0] = True
            i0, delta, j1 = owner[j0], inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    reduced = matrix[i0 - 1][j - 1] - u[i0] - v[j]
                    if reduced < slack[j]:
                        slack[j], way[j] = reduced, j0
                    if slack[j] < delta:
                        delta, j1 = slack[j], j
            for j in range(m + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    slack[j] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:  # flip the augmenting path
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    pairs = [(owner[j] - 1, j - 1) for j in range(1, m + 1) if owner[j]]
    if transposed:
        pairs = [(c, r) for r, c in pairs]
    return sorted(pairs)


def purity(assignment: list[int], labels: list) -> float:
    """The fraction of samples whose concept's most common label is their own."""
    counts: dict[int, dict] = {}
    for concept, label in zip(assignment, labels):
        counts.setdefault(concept, {}).setdefault(label, 0)
        counts[concept][label] += 1
    return sum(max(c.values()) for c in counts.values()) / max(len(labels), 1)
