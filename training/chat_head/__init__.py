"""Light heads for the chat's image model, trained on questions generated from the OpenKBP training patients."""
