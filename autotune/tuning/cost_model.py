"""MetaSchedule's XGBoost cost model, with its training made stable.

TVM's XGBModel scores a candidate as the sum of per-block predictions (the
"pack-sum" format) and trains that sum with a custom squared-error objective.
Three things in it go wrong on the Wan kernels with xgboost 3.x:

- Its hessian is the per-block one. When a tree puts all n blocks of a candidate
  into one leaf, the step moves each block by eta times the candidate's residual,
  so the candidate's score moves by n x eta times it: for n > 2 / eta = 10 blocks
  every boosting round overshoots further (the fused attention kernels have 16-17;
  the training loss grew from 13 to 1e17 in 50 rounds in our tuning logs).
- Every block starts at xgboost's base score (~0.5, estimated from the labels),
  so a candidate starts at n x 0.5 instead of near its label in [0, 1].
- The booster keeps the rounds after its best one (xgboost predicts with all
  trees unless told otherwise), so a diverged run predicts garbage.

One model is shared by every kernel of a tuning run, so one many-block kernel
spoils the predictions for all of them: the search then sees scores <= 0 for
every candidate (MetaSchedule clamps them to 0) and mutates at random.

Here the hessian is scaled by the candidate's block count (a bound on the
pack-sum's curvature, so every step stays stable), the base score is 0, and the
booster is cut at its best round. The model is otherwise TVM's own.
"""

from __future__ import annotations

import numpy as np
from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.cost_model.xgb_model import PackSum

from autotune.support.tvm_compat import xgb_model_class, xgb_training_callback


class StablePackSum(PackSum):
    """Pack-sum data whose objective takes stable Newton steps."""

    def __init__(self, xs, ys):
        super().__init__(xs=xs, ys=ys)
        self.blocks_per_candidate = np.bincount(self.ids)[self.ids].astype("float64")

    def obj_square_error(self, ys_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        candidate_pred = self.predict_with_score(ys_pred)[self.ids]
        ys = self.dmatrix.get_label()
        return (candidate_pred - ys) * ys, ys * self.blocks_per_candidate


@derived_object
class StableXGBModel(xgb_model_class()):
    """XGBModel whose training converges on kernels with many blocks."""

    def _train(self, xs: list[np.ndarray], ys: np.ndarray) -> None:
        import xgboost as xgb  # pylint: disable=import-outside-toplevel

        self.d_train = StablePackSum(xs=xs, ys=ys)
        params = {**self.config.to_dict(), "base_score": 0.0}
        booster = xgb.train(
            params,
            self.d_train.dmatrix,
            num_boost_round=10000,
            obj=lambda preds, _: self.d_train.obj_square_error(preds),
            callbacks=[
                xgb_training_callback(
                    early_stopping_rounds=self.early_stopping_rounds,
                    verbose_eval=self.verbose_eval,
                    fevals=[
                        lambda preds, _: self.d_train.rmse(preds),
                        lambda preds, _: self.d_train.average_peak_score(
                            preds, self.average_peak_n
                        ),
                    ],
                    evals=[(self.d_train.dmatrix, "tr")],
                    cvfolds=None,
                )
            ],
        )
        best = booster.attr("best_iteration")
        self.booster = booster[: int(best) + 1] if best is not None else booster
        del self.d_train


def make_cost_model(num_tuning_cores: int) -> StableXGBModel:
    """The cost model autotune tunes with."""
    return StableXGBModel(num_tuning_cores=num_tuning_cores)
