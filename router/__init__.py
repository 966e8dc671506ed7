"""The router: pagedserve's stateless front door (OpenAI HTTP API and public gRPC API).

Entry points: `router.server.run_router(model_dir, scheduler_addr, ...)` to serve,
`router.app.create_app(RouterCore(...))` for the FastAPI app alone. Never imports torch, scheduler,
executor or kernels; it talks to a scheduler over gRPC only.
"""
