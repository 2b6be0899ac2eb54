"""OpenAI's graders, for reinforcement fine-tuning jobs and the `/v1/fine_tuning/alpha/graders` endpoints.

`spec` owns the wire format (OpenAI's field names, validated with the offending field's dotted path);
`template` renders `{{sample.output_text}}` / `{{item.FIELD}}`; `runtime` turns a spec into something that
scores (sample, item) pairs; `text` holds the string and similarity metrics, `formula` the safe evaluator of a
multi grader's `calculate_output`, `sandbox` the subprocess that runs a `python` grader's code (never in the
calling process) and `model` the score_model / label_model calls. Nothing here imports torch.
"""

from tunelab.graders.spec import GRADER_TYPES, GraderError, GraderSpec, parse_grader

__all__ = ["GRADER_TYPES", "GraderError", "GraderSpec", "parse_grader"]
