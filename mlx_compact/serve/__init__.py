"""`mlx-compact serve`: an OpenAI-compatible server (needs the ``serve`` extra: Starlette and uvicorn).

`app.create_app(Settings(...))` is the ASGI app, `app.serve` runs it; `engine.Engine` computes a request,
`conversation` turns OpenAI messages into the segments a conversation is fed in, and `prefix.PrefixCache`
keeps conversation states between requests.
"""
