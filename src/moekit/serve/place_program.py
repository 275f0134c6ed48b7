"""The placement integer programs (scipy.optimize.milp, HiGHS).

`exact_program`: every layer at once. With x[l,e,d] binary (expert e of layer l on device d), z[l] >= load(l, d)
for every d, and w[l,i,j,d] <= x[l,i,d], w <= x[l+1,j,d] (pair (i, j) kept on device d), it minimises
alpha * sum_l z[l] - beta * sum deps[l][i,j] w[l,i,j,d] (+ the constant sum of deps), tightened by
sum_j w[l,i,j,d] = cap_d x[l,i,d] and sum_i w[l,i,j,d] = cap_d x[l+1,j,d] (each device holds cap_d experts of every
layer; the relaxation's bound is then `place_counts.kept_bound`'s). When N divides E the devices are
interchangeable, and they are numbered by their smallest layer-0 expert id (device d holds a layer-0 expert only if
device d-1 holds a smaller one), which removes the N! relabelled copies of every solution. Its size grows as
L E^2 N: the reference for small models.

`layer_program`: one layer re-placed exactly while the others stay. Expert e on device d then keeps
gain[e, d] = (mass from the previous layer's experts on d) + (mass to the next layer's experts on d), so the program
is an assignment with E N binaries: minimise alpha * z - beta * sum gain[e, d] x[e, d], each expert on one device,
cap_d experts per device, z >= each device's load. When that term cannot change (alpha = 0, or one expert per
device: the max load is the hottest expert's wherever it goes), it is a linear assignment of experts to the
devices' slots, solved exactly by scipy.optimize.linear_sum_assignment.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, linear_sum_assignment, milp

from moekit.serve.place_counts import RoutingCounts, capacities


def exact_program(counts: RoutingCounts, devices: int, alpha: float, beta: float, time_limit: float
                  ) -> tuple[np.ndarray | None, float, str]:
    """The whole program (module doc): (placement [L, E] or None, the solver's lower bound, status)."""
    L, E, N = counts.num_layers, counts.num_experts, devices
    nx = L * E * N
    nw = (L - 1) * E * E * N
    nvar = nx + L + nw
    x = np.arange(nx).reshape(L, E, N)
    z = nx + np.arange(L)
    c = np.zeros(nvar)
    c[z] = alpha
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add(cs, vs, lower, upper):
        nonlocal r
        rows.extend([r] * len(cs))
        cols.extend(cs)
        vals.extend(vs)
        lo.append(lower)
        hi.append(upper)
        r += 1

    cap = capacities(E, N)
    for li in range(L):
        for e in range(E):
            add(list(x[li, e]), [1.0] * N, 1, 1)
        for d in range(N):
            add(list(x[li, :, d]), [1.0] * E, cap[d], cap[d])
            add([*x[li, :, d], z[li]], [*counts.load[li], -1.0], -np.inf, 0)
    w = (nx + L + np.arange(nw)).reshape(max(L - 1, 0), E, E, N) if nw else None
    for li in range(L - 1):
        c[w[li]] = -beta * counts.deps[li][:, :, None]
        for i in range(E):
            for j in range(E):
                for d in range(N):
                    add([w[li, i, j, d], x[li, i, d]], [1.0, -1.0], -np.inf, 0)
                    add([w[li, i, j, d], x[li + 1, j, d]], [1.0, -1.0], -np.inf, 0)
        for d in range(N):  # x[l,i,d] * (sum_j x[l+1,j,d] = cap_d) and the same from the other side (RLT)
            for i in range(E):
                add([*w[li, i, :, d], x[li, i, d]], [1.0] * E + [-float(cap[d])], 0, 0)
                add([*w[li, :, i, d], x[li + 1, i, d]], [1.0] * E + [-float(cap[d])], 0, 0)
    upper = np.full(nvar, np.inf)
    upper[:nx] = 1
    upper[nx + L:] = 1
    if E % N == 0:  # equal devices are interchangeable: number them by their smallest layer-0 expert id
        for e in range(min(E, N)):  # expert e uses devices 0..e
            upper[x[0, e, e + 1:]] = 0
        for e in range(1, E):  # device d only when device d-1 holds a smaller expert id
            for d in range(1, min(e, N - 1) + 1):
                add([x[0, e, d], *x[0, :e, d - 1]], [1.0] + [-1.0] * e, -np.inf, 0)
    integrality = np.zeros(nvar)
    integrality[:nx] = 1
    A = sparse.csr_array((vals, (rows, cols)), shape=(r, nvar))
    res = milp(c, constraints=LinearConstraint(A, lo, hi), integrality=integrality,
               bounds=Bounds(np.zeros(nvar), upper), options={"time_limit": time_limit, "disp": False})
    if res.x is None:
        return None, -np.inf, res.message
    device = res.x[:nx].reshape(L, E, N).argmax(axis=2)
    const = beta * sum(d.sum() for d in counts.deps)
    bound = getattr(res, "mip_dual_bound", None)
    bound = -np.inf if bound is None or not np.isfinite(bound) else float(bound) + const
    return device, bound, "optimal" if res.status == 0 else str(res.message)


def layer_gain(counts: RoutingCounts, device: np.ndarray, li: int, devices: int) -> np.ndarray:
    """[E, N]: the dependency mass expert e of layer li keeps on device d given the other layers' placement."""
    gain = np.zeros((counts.num_experts, devices))
    if li > 0:
        gain += counts.deps[li - 1].T @ np.eye(devices)[device[li - 1]]
    if li + 1 < counts.num_layers:
        gain += counts.deps[li] @ np.eye(devices)[device[li + 1]]
    return gain


def layer_program(counts: RoutingCounts, device: np.ndarray, li: int, devices: int, alpha: float, beta: float,
                  time_limit: float) -> np.ndarray | None:
    """Layer li's best placement [E] with every other layer of `device` fixed (module doc); None without a
    solution in time."""
    E, N = counts.num_experts, devices
    gain = layer_gain(counts, device, li, N)
    cap = capacities(E, N)
    if alpha == 0 or cap.max() == 1:
        slot_device = np.repeat(np.arange(N), cap)
        rows, cols = linear_sum_assignment(-beta * gain[:, slot_device])
        out = np.empty(E, dtype=np.int64)
        out[rows] = slot_device[cols]
        return out
    nx = E * N
    c = np.concatenate([-beta * gain.reshape(-1), [alpha]])
    e_of, d_of = np.divmod(np.arange(nx), N)
    one = sparse.csr_array((np.ones(nx), (e_of, np.arange(nx))), shape=(E, nx + 1))
    count = sparse.csr_array((np.ones(nx), (d_of, np.arange(nx))), shape=(N, nx + 1))
    load = sparse.csr_array((np.concatenate([counts.load[li][e_of], -np.ones(N)]),
                             (np.concatenate([d_of, np.arange(N)]), np.concatenate([np.arange(nx), np.full(N, nx)]))),
                            shape=(N, nx + 1))
    cons = [LinearConstraint(one, 1, 1), LinearConstraint(count, cap, cap), LinearConstraint(load, -np.inf, 0)]
    integrality = np.concatenate([np.ones(nx), [0]])
    upper = np.concatenate([np.ones(nx), [np.inf]])
    res = milp(c, constraints=cons, integrality=integrality, bounds=Bounds(np.zeros(nx + 1), upper),
               options={"time_limit": max(time_limit, 0.01), "disp": False})
    if res.x is None:
        return None
    return res.x[:nx].reshape(E, N).argmax(axis=1)
