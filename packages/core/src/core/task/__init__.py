"""The task contract (``base.Task``) and what a task package builds on: records readers, chat
turns and images, datasets and collators, the token cache, the model hub, metrics, input
truncation.
"""

from core import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "adapters": (
            "attach_adapter linear_module_names peft_quietly read_adapter_config resolve_base"
        ),
        "base": (
            "EvaluationRun IGNORE_INDEX Ranks StepOutput Task chunked_per_sample_loss "
            "chunked_token_loss_sum per_sample_loss token_loss_sum"
        ),
        "batching": (
            "PackedDataset Seq2SeqCollator TokenDataset collate_causal flatten_batch pack"
        ),
        "chat": (
            "ChatReader assistant_spans build_labels map_images record_name template_pieces "
            "up_to_last_answer"
        ),
        "hub": "ensure_available hub_reachable is_cached looks_like_path",
        "metrics": (
            "DefaultTokenizer UnicodeWordTokenizer answer_scores describe resolve_tokenizer rouge"
        ),
        "encode_report": "EncodeStats",
        "images": "ImageSource image_sizes load_image resolve_image",
        "imagetext": "VISION_TOKENS answers image_prompt pad_image_batch",
        "packed_forward": "call_model check_packing",
        "records": "BadJSON check_file iter_source read_all read_objects split_holdout",
        "response_encoder": "PROMPT_TAIL PromptTooLong ResponseEncoder encode_records",
        "shapes": "data_uri draw example_records write_examples",
        "textbatch": "continuations pad_batch",
        "textrecords": "TextRecord read_text_records",
        "tiny_tokenizer": "BpeRecipe save_fast train_bpe write_record",
        "token_cache": "cached_map content_fingerprint tokenizer_fingerprint",
        "truncation": "Truncation add_option cut_ids input_limit length_stats model_limit",
        "wordlevel": "word_tokenizer",
    },
)
