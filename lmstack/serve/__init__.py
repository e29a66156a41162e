"""Serving: the OpenAI-compatible API, the web app (chat, label, monitor) and the feedback DB.

batcher.py     continuous batching: one thread decodes every running request together
generation.py  between HTTP and the batcher: the served model, its checks, a request's generations
api.py         the HTTP API (FastAPI): /v1/models, /v1/chat/completions, /v1/completions, tokenizer
protocol.py    request bodies, errors in OpenAI's shape, limits, the body-size guard
webapp.py      the web app and its JSON API (feedback, labelling queue, monitor)
db.py          the feedback database (SQLite, versioned schema) and its export to training data
server.py      `lmstack serve`: load the model, build the app (API + web app), run uvicorn
"""
