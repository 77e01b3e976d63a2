"""Config tables shipped with moetune (vLLM format); found by moetune.lookup."""
