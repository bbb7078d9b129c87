"""k proposals of Optuna's multivariate TPE sampler on arrays: the fast path of PB2's explore.

PB2 asks a TPESampler for k hyperparameter proposals, the recent observations added as complete
trials of an in-memory study and each asked trial left running, so that TPE's constant liar
counts the proposals already made among the bad ones and spreads the next one away from them
(evo/pb2.py `_study_proposals`, the plain path). Through a study each ask builds a trial in
the storage, re-reads every trial, looks up each one's parameters and splits them again, in
Python. Here the same steps run on arrays, each done once where the asks share it:

    below, above = the observations split at TPE's gamma(n) best values (each kept in order)
    l = Parzen estimator of below                     (the same for every ask: no ask is complete)
    candidates of each ask = n_ei_candidates draws of l, k times in turn (the sampler's RandomState)
    log l of all the candidates at once
    for each of the k asks:
        g = Parzen estimator of above                 (+ the proposals so far, with constant liar)
        proposal = the ask's candidate maximising log l - log g

with the sampler's own estimator class, parameters, gamma, random state and comparison, so the
k proposals are the plain path's, number for number (tests/evo/test_tpe_batch.py checks it on
float, log, stepped and categorical genes). This reaches into TPESampler's private members;
`usable` says whether this sampler has them and is configured as PB2 builds it, and PB2 takes
the plain path otherwise.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

_MEMBERS = ("_parzen_estimator_cls", "_parzen_estimator_parameters", "_rng", "_n_ei_candidates",
            "_constant_liar", "_compare", "_gamma", "_multivariate",
            "_group", "_n_startup_trials")


def usable(sampler: Any, distributions: dict[str, Any], n: int) -> bool:
    """Whether `proposals` asks this sampler as a study would: a multivariate, ungrouped,
    unconstrained TPESampler past its start-up trials (n observations), whose private members
    are those this module calls, over distributions of more than one value each."""
    import optuna

    return (
        type(sampler) is optuna.samplers.TPESampler   # a subclass may sample otherwise
        and all(hasattr(sampler, a) for a in _MEMBERS)
        and sampler._multivariate is True
        and not sampler._group
        and getattr(sampler, "_constraints_func", None) is None
        and n >= sampler._n_startup_trials
        and n > 0
        and not any(d.single() for d in distributions.values())
    )


def proposals(
    sampler: Any, distributions: dict[str, Any], params: Sequence[dict[str, Any]],
    values: Sequence[float], k: int,
) -> list[dict[str, Any]]:
    """What k `study.ask(distributions)` return (their `.params`) on a maximising study holding
    one complete trial per (params, value), in order, with each asked trial left running."""
    from optuna.samplers._tpe.sampler import default_gamma

    if k == 0:
        return []

    space = dict(sorted(distributions.items(), key=lambda item: item[0]))   # TPE's relative search space: sorted by name
    internal = {p: [d.to_internal_repr(x[p]) for x in params] for p, d in space.items()}
    n = len(values)
    gamma = sampler._gamma if sampler._gamma is not None else default_gamma
    n_below = min(gamma(n), n)
    best_first = sorted(range(n), key=lambda i: values[i], reverse=True)   # stable, as TPE's split
    below = sorted(best_first[:n_below])
    above = sorted(best_first[n_below:])

    def estimator(rows: dict[str, list]) -> Any:
        observations = {p: np.asarray(v) for p, v in rows.items()}
        return sampler._parzen_estimator_cls(observations, space, sampler._parzen_estimator_parameters)

    good = estimator({p: [v[i] for i in below] for p, v in internal.items()})
    # l and the random state do not change between asks: draw every ask's candidates in turn
    # (the same draws, in the same order) and weigh them under l at once
    draws = [good.sample(sampler._rng.rng, sampler._n_ei_candidates) for _ in range(k)]
    log_good = good.log_pdf({p: np.concatenate([c[p] for c in draws]) for p in space}).reshape(k, -1)
    bad_rows = {p: [v[i] for i in above] for p, v in internal.items()}
    out = []
    for candidates, log_l in zip(draws, log_good):
        bad = estimator(bad_rows)
        best = sampler._compare(candidates, log_l - bad.log_pdf(candidates))   # TPE's acquisition
        proposal = {p: d.to_external_repr(best[p]) for p, d in space.items()}
        out.append({p: proposal[p] for p in distributions})
        if sampler._constant_liar:   # the running trial counts among the bad ones
            for p, d in space.items():
                bad_rows[p].append(d.to_internal_repr(proposal[p]))
    return out
