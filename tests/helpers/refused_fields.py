"""For each field the HTTP API refuses (services/gateway/openai_fields.REFUSED), a value it is
refused with: the unit and e2e tests send each one."""

REFUSING = {
    "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
    "functions": [{"name": "f"}], "function_call": {"name": "f"}, "response_format": {"type": "json_object"},
    "logit_bias": {"50256": -100}, "suffix": "end", "audio": {"voice": "x"}, "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "low", "web_search_options": {},
    "guided_json": {}, "guided_regex": "a+", "guided_choice": ["a"], "guided_grammar": "g", "structured_outputs": {},
    "grammar": "root ::= x", "json_schema": {"type": "object"}, "use_beam_search": True, "length_penalty": 2.0,
    "stop_token_ids": [2], "include_stop_str_in_output": True, "truncate_prompt_tokens": 8,
    "prompt_logprobs": 1, "return_tokens_as_token_ids": True, "typical_p": 0.5, "tfs_z": 0.5, "mirostat": 2,
    "n_probs": 3,
}
