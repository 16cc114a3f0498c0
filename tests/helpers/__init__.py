"""One copy of what tests share: ports, the CLI and torchrun runners, servers, state builders."""
