"""The Ray Serve application: an OpenAI-compatible endpoint for packed bitllava models.

serve.app (build_app, run_serve) -> serve.ingress (ChatIngress, FastAPI) -> serve.model_deployment
(BitLlavaModel) -> serve.engine (continuous batching). Settings: serve.settings, serve/serve.yaml.
"""
