"""The container wing: the image entrypoint, GPU slots for agents, the docker-SDK launcher, transfer bundles."""
