"""Evaluation: generate benchmark videos (sharded, resumable), score them, and measure speed.

``python eval.py`` composes ``conf/eval.yaml`` and calls `run`, which dispatches on ``stage``:

* ``generate`` (`t3.eval.generate_stage`): one video per prompt and seed; safe to kill and rerun;
* ``score`` (`t3.eval.score_stage`): ``fvd_i3d``, ``fvd_i3d_crop224``, ``vtc_clip`` (``vtc_viclip`` and
  ``vqa_dover`` are reported as skipped: see `t3.eval.metrics`);
* ``speed`` (`t3.eval.speed_stage`): dense vs T3 latency, attention share, peak memory and MACs.

The metrics are t3's own, named after their models; they are not the T3 paper's VQA/VTC numbers.
"""

from t3.eval.run import STAGES, run

__all__ = ["STAGES", "run"]
