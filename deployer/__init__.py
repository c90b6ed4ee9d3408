"""model-deployer: plan and deploy an LLM inference service onto one GPU host over SSH."""
