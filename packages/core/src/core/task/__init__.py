"""The task contract (``base.Task``) and what a task package builds on: records readers, the model
hub, metrics, input truncation.
"""

from core import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "base": (
            "EvaluationRun IGNORE_INDEX Ranks StepOutput Task chunked_per_sample_loss "
            "chunked_token_loss_sum no_split_classes per_sample_loss token_loss_sum"
        ),
        "hub": "ensure_available hub_reachable is_cached looks_like_path",
        "metrics": (
            "DefaultTokenizer UnicodeWordTokenizer answer_scores describe resolve_tokenizer rouge"
        ),
        "records": "BadJSON check_file iter_source read_all",
        "truncation": "Truncation add_option cut_ids input_limit model_limit",
    },
)
