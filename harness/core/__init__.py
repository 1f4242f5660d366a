"""The base layer: records and data formats, errors, file helpers, prompt rendering, model loading, which
rank this process is, and the generation contract. It imports nothing above it; evaluators/ may import it."""
