"""The web app (chat, label, monitor) and its JSON API. (Being written.)"""


def add_webapp(app, server) -> None:
    pass
