"""The REST service: Ray Serve deployments (ingress + model), schemas, URL fetching, serving logic."""
