"""TPS smoothing of the registered displacements: the error against known motion per lambda, and
the lambda that generalised cross-validation (GCV) would pick from the displacements alone.

``python benchmarks/tps_smoothing.py [RUN_DIR] [--seeds 0 1 2] [--scales 1 2] [--lambdas ...] [--threads 2]
[--spread-weighted]``

Every fold's model of ``RUN_DIR`` (default ``models/copd``) registers the synthetic breathing
pairs of :mod:`cyclereg.clouds.synthetic` with its stored test-time settings. The displacements
at the fixed keypoints (unit frame) are then densified by a TPS with each ``--lambdas`` value and
the mean error at the keypoints against the known motion (mm) is printed per case, with the
lambda of the smallest error and the lambda of the smallest GCV score
``N ||(I - A) y||^2 / tr(I - A)^2`` (``A``: the smoother matrix), which needs no ground truth.
GCV is computed exactly from one eigendecomposition of the kernel matrix projected onto the
complement of the affine polynomials. With ``--spread-weighted`` (ensembles only) it also prints
the error of a TPS whose smoothing varies per point with the members' disagreement (lambda_i =
lambda (s_i / mean s)^2 at the stored lambda, i.e. points the members agree on are trusted more)
and the correlation of that spread with the error per point. No landmark is read.
"""

from __future__ import annotations

import argparse

import torch

from cyclereg.clouds.api import exported_model_files, load_cloud_model
from cyclereg.clouds.pipeline import member_spread, register_clouds
from cyclereg.clouds.synthetic import BreathingConfig, make_breathing_pair
from cyclereg.clouds.tps import ThinPlateSpline, _phi
from cyclereg.errors import InputError, finite_number, require_count, require_seed


def gcv_scores(centres: torch.Tensor, values: torch.Tensor, lambdas: list[float], kernel: str) -> list[float]:
    """GCV score of the TPS fit ``(Phi + lambda I) w + P a = y`` for each lambda.

    With ``Q2`` an orthonormal basis of the complement of ``P = [1, x]`` and
    ``Q2^T Phi Q2 = V diag(e) V^T``, the residual is ``y - y_hat = lambda w =
    Q2 V diag(lambda / (e + lambda)) V^T Q2^T y``, so ``||(I - A) y||^2`` and ``tr(I - A)`` follow
    from the eigenvalues for every lambda at once.
    """
    c, y = centres.double(), values.double()
    n = c.shape[0]
    P = torch.cat([torch.ones(n, 1, dtype=c.dtype), c], dim=1)
    Q, _ = torch.linalg.qr(P, mode="complete")
    Q2 = Q[:, P.shape[1]:]
    e, V = torch.linalg.eigh(Q2.T @ _phi(torch.cdist(c, c), kernel) @ Q2)
    z2 = ((V.T @ (Q2.T @ y)) ** 2).sum(1)
    out = []
    for lam in lambdas:
        f = lam / (e + lam)
        out.append((n * (f * f * z2).sum() / f.sum() ** 2).item())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", default="models/copd")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0, 4.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spread-weighted", action="store_true")
    args = ap.parse_args()
    try:  # bad input: one line before any work
        require_count("--threads", args.threads, 1)
        for seed in args.seeds:
            require_seed(seed, "--seeds")
        for scale in args.scales:
            if not finite_number(scale):
                raise InputError(f"--scales {scale}: need a finite number")
        for lam in args.lambdas:
            if not finite_number(lam) or lam < 0:
                raise InputError(f"--lambdas {lam}: need a finite number >= 0")
        folds = exported_model_files(args.run)
    except InputError as exc:
        ap.exit(1, f"error: {exc}\n")
    torch.set_num_threads(args.threads)
    lams = args.lambdas
    picks = {"error": [], "gcv": []}
    weighted: dict[str, list[float]] = {"stored lambda": [], "spread-weighted": [], "correlation": []}
    for path in folds:
        net, cfg = load_cloud_model(path)
        for scale in args.scales:
            for seed in args.seeds:
                pair = make_breathing_pair(seed, BreathingConfig().scaled_motion(scale))
                reg = register_clouds(pair.fixed_mm, pair.moving_mm, net, cfg, spread=args.spread_weighted)
                box = reg.box
                fu, disp = box.mm_to_unit(pair.fixed_mm), box.disp_mm_to_unit(reg.displacements_mm)
                errors = []
                for lam in lams:
                    spline = ThinPlateSpline.fit(fu, disp, regularisation=lam, kernel=cfg.tps.kernel)
                    errors.append((box.disp_unit_to_mm(spline(fu)) - pair.displacement_mm).norm(dim=1).mean().item())
                gcv = gcv_scores(fu, disp, lams, cfg.tps.kernel)
                best, chosen = lams[errors.index(min(errors))], lams[gcv.index(min(gcv))]
                picks["error"].append(best)
                picks["gcv"].append(chosen)
                print(f"{path.stem} motion x{scale:g} seed {seed}: error [mm] at lambda "
                      + " ".join(f"{lam:g}: {err:.3f}" for lam, err in zip(lams, errors))
                      + f" | smallest error at {best:g}, GCV picks {chosen:g}", flush=True)
                if args.spread_weighted and reg.member_displacements_mm is not None:
                    spread = member_spread([box.disp_mm_to_unit(d) for d in reg.member_displacements_mm])
                    lam = cfg.tps.regularisation
                    for name, per_point in (("stored lambda", torch.full_like(spread, lam)),
                                            ("spread-weighted", lam * (spread / spread.mean()) ** 2)):
                        fitted = ThinPlateSpline.fit(fu, disp, regularisation=per_point, kernel=cfg.tps.kernel)(fu)
                        weighted[name].append((box.disp_unit_to_mm(fitted) - pair.displacement_mm).norm(dim=1).mean().item())
                    raw = (reg.displacements_mm - pair.displacement_mm).norm(dim=1)
                    weighted["correlation"].append(torch.corrcoef(torch.stack([spread, raw]))[0, 1].item())
                    print(f"  lambda {lam:g}: {weighted['stored lambda'][-1]:.3f} mm, spread-weighted "
                          f"{weighted['spread-weighted'][-1]:.3f} mm; correlation of spread and error per point "
                          f"{weighted['correlation'][-1]:.2f}", flush=True)
    n = len(picks["gcv"])
    agree = sum(a == b for a, b in zip(picks["error"], picks["gcv"]))
    print(f"{n} cases: GCV picks the lambda of the smallest error in {agree}; "
          f"GCV picks {sorted(set(picks['gcv']))}, the error is smallest at {sorted(set(picks['error']))}")
    if weighted["correlation"]:
        print(", ".join(f"{k}: mean {sum(v) / len(v):.3f}" for k, v in weighted.items())
              + f" ({len(weighted['correlation'])} cases; errors in mm)")


if __name__ == "__main__":
    main()
