"""Pure analysis of saved results: metrics, significance statistics, diagnostics.
Imports numpy/scipy only, no other cnnlab module."""
