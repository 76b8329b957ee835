"""An OpenAI-compatible HTTP server over an EngineFrontend (build_app, HttpServer)."""
