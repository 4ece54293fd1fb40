"""twistd plugin: ``twistd -n mailappliance --config PATH`` starts the mail appliance."""

from twisted.application.service import ServiceMaker

mailappliance = ServiceMaker(
    "mailbox_appliance",
    "mailbox_appliance.tap",
    "All-in-one mail appliance: MX, submission, LMTP, IMAP/POP3, queue, directory.",
    "mailappliance",
)
