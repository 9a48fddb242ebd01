"""Small helpers every layer of the suite may import (it imports none of them)."""
