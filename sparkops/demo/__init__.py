"""The demo: a living sprint, the demo agent and a simulated vLLM."""
