"""Evaluation: generate benchmark videos (sharded, resumable), score them, and measure speed.

``python eval.py`` composes ``conf/eval.yaml`` and calls `main` (`run`, with bad input reported in one
line), which dispatches on ``stage``:

* ``generate`` (`t3.eval.generate_stage`): one video per prompt and seed; safe to kill and rerun;
* ``score`` (`t3.eval.score_stage`): ``fvd_i3d``, ``fvd_i3d_crop224``, ``vtc_clip``, and ``vtc_viclip`` and
  ``vqa_dover*`` through the authors' code from local VBench and DOVER checkouts (`t3.eval.metrics`);
* ``speed`` (`t3.eval.speed_stage`): dense vs T3 latency, attention share, peak memory and MACs.

The metrics are named after their models; none is claimed to be the T3 paper's VQA/VTC number.
"""

from t3.eval import prompts
from t3.eval.run import STAGES, main, register_resolvers, run

prompts.register_resolvers()  # ${t3.prompt_list:...} in conf/benchmark/*.yaml
register_resolvers()  # ${t3.recorded_schedule:...} in conf/t3/from_checkpoint.yaml

__all__ = ["STAGES", "main", "run"]
