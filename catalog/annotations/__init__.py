"""Human annotations (part 4): annotators and their tokens, versioned annotations of model neurons,
the review queue, agreement between annotators, and export / import of annotations."""
