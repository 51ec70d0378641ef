"""vlmserve: a self-hosted inference server for vision-language models (NVIDIA NIM for VLMs API)."""

__version__ = "0.1.0"
# The API version reported by GET /v1/version: the OpenAI chat-completions surface NIM for VLMs speaks.
API_VERSION = "v1"
