"""PRISM-RT chat: free-text questions about a CT, answered exactly where the data allows (header, geometry, loaded
structures) and by the image model only where the pixels alone can tell; see ``session.ChatSession``."""
