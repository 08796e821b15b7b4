"""The environment that keeps Speeder's processes from reaching the internet on their own: no usage
statistics (Ray), no analytics (Gradio), no hub telemetry (Hugging Face). Defined once; the command line
sets it for itself, every Ray worker gets it (`ray_utils.WORKER_ENV`), the UI sets it before Gradio loads.

HF_HUB_OFFLINE is not here: a GPU cluster may download a backbone from the hub (jobs/train.yaml); the
Makefile and the UI set it where weights come from installed packages only.
"""

NO_TELEMETRY: dict[str, str] = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}
