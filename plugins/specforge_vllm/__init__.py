"""specforge bundled plugin: vllm (target backend, evaluation engine). Importing it imports no vLLM."""
