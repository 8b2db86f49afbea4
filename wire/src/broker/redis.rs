//! Redis broker with kombu's virtual-transport layout.
