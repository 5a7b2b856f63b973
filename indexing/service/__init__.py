"""The service room: the HTTP search service, its page, and its Ray Serve wrapper, over the search room's library.
Imports the embedding and search rooms, never the index room."""
