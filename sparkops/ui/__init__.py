"""What the app's pages show: one view module per page (cached reads from the
library, frames and charts), and the page frame they share."""
