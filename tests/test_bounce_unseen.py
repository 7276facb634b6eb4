"""Synchronous replies the corpus does not hold, written from the texts MTAs
and providers document (Postfix postconf(5)/anvil(8), Exim's specification,
RFC 5321/6647, Microsoft's NDR pages, Proofpoint's IP check, greylisting
implementations' replies), each checked for the decision the delivery side
acts on: the reason, hard or soft, and the two feedback signals
(``rate_limited`` slows the site down, ``ip_blocked`` rests the IP for an
hour, so a false one costs an hour of mail to that site).

The replies Postfix itself gives are also driven from a real Postfix in
tests/test_bounce_real_mta.py; these cover wordings no MTA on the machine
produces.
"""

from __future__ import annotations

import pytest

from fastsend.bounce import classify_reply, parse_bounce

# (code, enhanced, text, stage) -> (reason, hard, rate_limited, ip_blocked)
CASES = [
    # A refused MAIL FROM whose words say an address or domain does not exist
    # is about our sender (RFC 5321 3.3; RFC 7504 3: a 556 at MAIL FROM names
    # the sender's domain; Exim's failed sender verification ends
    # "Unrouteable address"): rejected, never a recipient's hard bounce.
    ((550, "", "Unrouteable address", "MAIL"), ("rejected", False, False, False)),
    ((556, "", "Domain does not accept mail", "MAIL"), ("rejected", False, False, False)),
    (
        (553, "", "Domain does not exist: bounce.example.org", "MAIL"),
        ("rejected", False, False, False),
    ),
    # Refused at RCPT (Postfix delays its sender checks to RCPT TO), the words
    # naming our sender, its domain or the return path as what is unknown: a
    # refusal of the sender, not of this recipient (it was userunknown, hard).
    (
        (550, "5.1.0", "Sender address <bounce@bounce.example.org> not found", "RCPT"),
        ("rejected", False, False, False),
    ),
    (
        (550, "", "The sender domain bounce.example.org does not exist", "RCPT"),
        ("rejected", False, False, False),
    ),
    ((550, "", "Return path domain does not exist", "RCPT"), ("rejected", False, False, False)),
    ((550, "", "Unknown sender domain", "RCPT"), ("rejected", False, False, False)),
    # A sending limit named by its period, whatever status wraps it (a 5.1.1
    # made it userunknown, hard: each recipient of the hour suppressed).
    (
        (550, "5.1.1", "You have sent too many messages this hour, please try again later", "RCPT"),
        ("speeding", False, True, False),
    ),
    (
        (550, "5.1.1", "Too many mails per day from this sender", "RCPT"),
        ("speeding", False, True, False),
    ),
    # Google Workspace's "Send mail as" misconfiguration and Exchange's sender
    # filter agent: our sender's address or setup, not the recipient's.
    (
        (
            550,
            "",
            "You're sending this from a different address or alias using the "
            "'Send mail as' feature. The settings for your 'Send mail as' account "
            "are misconfigured or out of date.",
            "",
        ),
        ("rejected", False, False, False),
    ),
    (
        (
            554,
            "5.1.0",
            "Sender denied as sender's email address is on SenderFilterConfig list",
            "RCPT",
        ),
        ("rejected", False, False, False),
    ),
    # Postfix anvil(8) limits: the client sends too fast; not a block.
    (
        (450, "4.7.1", "Error: too much mail from 192.0.2.1", "MAIL"),
        ("speeding", False, True, False),
    ),
    (
        (450, "4.7.1", "<a@x.test>: Error: too many recipients from 192.0.2.1", "RCPT"),
        ("speeding", False, True, False),
    ),
    # A per-message recipient limit (RFC 5321 4.5.3.1.10): the rest go in
    # another transaction; nothing about pace or the IP.
    (
        (452, "4.5.3", "Error: too many recipients", "RCPT"),
        ("toomanyconn", False, False, False),
    ),
    ((452, "", "Too many recipients", "RCPT"), ("toomanyconn", False, False, False)),
    # Connection limits stay a slow-down signal.
    (
        (421, "4.7.0", "mx.x.test Error: too many connections from 192.0.2.1", "CONN"),
        ("toomanyconn", False, True, False),
    ),
    # Exim's documented ratelimit ACL message, and common wording.
    (
        (450, "", "Sender rate overlimit - 10.0 / 1h", "MAIL"),
        ("speeding", False, True, False),
    ),
    (
        (450, "4.7.1", "You have exceeded the rate limit. Please slow down.", "RCPT"),
        ("speeding", False, True, False),
    ),
    # Greylisting (RFC 6647) under the codes and wordings implementations
    # use: retried from the same IP, no signal.
    (
        (451, "4.7.1", "greylisting, please try again later", "RCPT"),
        ("blocked", False, False, False),
    ),
    (
        (457, "", "Greylisted, please come back later.", "RCPT"),
        ("blocked", False, False, False),
    ),
    (
        (451, "4.7.1", "Greylisting in action, please come back in 00:05:00", "RCPT"),
        ("blocked", False, False, False),
    ),
    # A temporary refusal with only a generic status and no word about the
    # IP (rspamd's soft reject and greylisting answer "Try again later"):
    # never a reason to rest the IP, nor to slow down (a policy status X.7.x:
    # a retry asked for, not a slower pace; bnc26's audit).
    ((451, "4.7.1", "Try again later", "DATA"), ("blocked", False, False, False)),
    ((450, "4.7.1", "Service unavailable", "RCPT"), ("blocked", False, False, False)),
    (
        (451, "4.7.1", "Local policy violation", "RCPT"),
        ("blocked", False, False, False),
    ),
    (
        (
            421,
            "",
            "mx.x.test Service not available, closing transmission channel",
            "CONN",
        ),
        ("blocked", False, False, False),
    ),
    # RFC 5321's own text for a server closing the session, after any
    # command: shutting down or overloaded, nothing about the client.
    (
        (
            421,
            "",
            "mx.x.test Service not available, closing transmission channel",
            "RCPT",
        ),
        ("blocked", False, False, False),
    ),
    (
        (
            421,
            "4.3.2",
            "mx.x.test Service not available, closing transmission channel",
            "DATA",
        ),
        ("blocked", False, False, False),
    ),
    (
        (
            421,
            "",
            "mx.x.test Service not available, closing transmission channel: your IP is blacklisted",
            "RCPT",
        ),
        ("blocked", False, False, True),
    ),
    # ...but words about the IP still make it a block, 4xx or 5xx.
    (
        (421, "", "Your IP has been temporarily blocked", "CONN"),
        ("blocked", False, False, True),
    ),
    (
        (554, "", "mx.x.test Service unavailable", "CONN"),
        ("blocked", False, False, True),
    ),
    # Proofpoint Dynamic Reputation.
    (
        (
            554,
            "5.7.0",
            "Blocked - see https://ipcheck.proofpoint.com/?ip=192.0.2.1",
            "RCPT",
        ),
        ("blocked", False, False, True),
    ),
    # Microsoft 5.7.708: the IP is refused (delisting is the remedy), not
    # a rate limit.
    (
        (
            550,
            "5.7.708",
            "Service unavailable. Access denied, traffic not accepted from this IP.",
            "RCPT",
        ),
        ("blocked", False, False, True),
    ),
    (
        (550, "", "Access denied, traffic not accepted from this IP.", "RCPT"),
        ("blocked", False, False, True),
    ),
    # Gmail: one recipient receiving too fast is that mailbox's limit; it
    # must not slow all mail to the site down.
    (
        (
            450,
            "4.2.1",
            "The user you are trying to contact is receiving mail at a rate that prevents "
            "additional messages from being delivered. Please resend your message at a later time.",
            "RCPT",
        ),
        ("speeding", False, False, False),
    ),
    # SPF refusals in Exim's documented wording and Mimecast's: a record to
    # fix in DNS, not an IP block.
    (
        (
            550,
            "",
            "SPF: 192.0.2.1 is not allowed to send mail from example.com",
            "RCPT",
        ),
        ("authfailure", False, False, False),
    ),
    (
        (
            550,
            "",
            "Submitter failed SPF Policy - https://community.mimecast.com/docs/DOC-1369#550",
            "MAIL",
        ),
        ("authfailure", False, False, False),
    ),
    (
        (
            550,
            "",
            "Rejected by header based Blocked Senders - https://community.mimecast.com/docs/DOC-1369#550",
            "DATA",
        ),
        ("rejected", False, False, False),
    ),
    # The Spamhaus DBL lists domains in the content; a spam verdict naming a
    # filter vendor is about the content: neither rests the IP.
    (
        (
            550,
            "5.7.1",
            "Your email was rejected due to having a domain present in the Spamhaus DBL "
            "-- see https://www.spamhaus.org/dbl/",
            "DATA",
        ),
        ("spamdetected", False, False, False),
    ),
    (
        (554, "5.7.1", "Message contains a URL listed in dbl.spamhaus.org", "DATA"),
        ("spamdetected", False, False, False),
    ),
    (
        (554, "", "Message rejected due to spam content (Barracuda)", "DATA"),
        ("spamdetected", False, False, False),
    ),
    (
        (
            554,
            "5.7.1",
            "Service unavailable; Client host [192.0.2.1] blocked using Barracuda Reputation; "
            "http://www.barracudanetworks.com/reputation/?r=1&ip=192.0.2.1",
            "RCPT",
        ),
        ("blocked", False, False, True),
    ),
    # Yahoo's [TS03] says retrying will not succeed: the IP is refused, not
    # asked to slow down ([TS01]/[TS02] are the slow-downs).
    (
        (
            421,
            "4.7.1",
            "[TS03] All messages from 192.0.2.1 will be permanently deferred; Retrying will NOT "
            "succeed. See https://help.yahoo.com/kb/postmaster/SLN3436.html",
            "MAIL",
        ),
        ("blocked", False, False, True),
    ),
    (
        (
            421,
            "4.7.0",
            "[TS01] Messages from 192.0.2.1 temporarily deferred due to user complaints - 4.16.55.1",
            "MAIL",
        ),
        ("speeding", False, True, False),
    ),
    # Microsoft's throttles (4.7.500-699, "AS" codes): the IP is rate limited
    # for its reputation; slowing down is the remedy, not an hour's rest.
    (
        (
            451,
            "4.7.500",
            "Server busy. Please try again later from [192.0.2.1]. (S77714) "
            "[AM4PEPF00027A5F.eurprd04.prod.outlook.com]",
            "RCPT",
        ),
        ("badreputation", False, True, False),
    ),
    (
        (
            451,
            "4.7.650",
            "The mail server [192.0.2.1] has been temporarily rate limited due to IP "
            "reputation. For e-mail delivery information, see https://aka.ms/postmaster (S775)",
            "RCPT",
        ),
        ("badreputation", False, True, False),
    ),
    # Yahoo's [TSS04]: deferred for volume or complaints, retry later and
    # slower; the IP's refusal is [TSS09]. At MAIL FROM it is filed by stage.
    (
        (
            421,
            "4.7.0",
            "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or "
            "user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
            "MAIL",
        ),
        ("rejected", False, True, False),
    ),
    (
        (
            421,
            "4.7.0",
            "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or "
            "user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
            "CONN",
        ),
        ("blocked", False, True, False),
    ),
    (
        (
            553,
            "5.7.2",
            "[TSS09] All messages from 192.0.2.1 will be permanently deferred; Retrying will NOT "
            "succeed. See https://postmaster.yahooinc.com/error-codes",
            "MAIL",
        ),
        ("blocked", False, False, True),
    ),
    # A refused HELO name (Postfix smtpd_helo_restrictions, delayed to RCPT):
    # the name must change; resting the IP changes nothing.
    (
        (
            504,
            "5.5.2",
            "<localhost>: Helo command rejected: need fully-qualified hostname",
            "RCPT",
        ),
        ("blocked", False, False, False),
    ),
    (
        (450, "4.7.1", "<mta1>: Helo command rejected: Host not found", "RCPT"),
        ("blocked", False, False, False),
    ),
    (
        (501, "5.5.2", "<mta_1>: Helo command rejected: Invalid name", "RCPT"),
        ("blocked", False, False, False),
    ),
    # ...unless the words are about a block list.
    (
        (
            554,
            "5.7.1",
            "<mta1.x.test>: Helo command rejected: Client host [192.0.2.1] blocked using "
            "zen.spamhaus.org",
            "RCPT",
        ),
        ("blocked", False, False, True),
    ),
    # A TCP connection refused, as MTAs quote it in a DSN (no SMTP reply):
    # no word from the site about the IP.
    (
        (0, "4.4.1", "connect to mx.x.test[192.0.2.1]:25: Connection refused", ""),
        ("expired", False, False, False),
    ),
    (
        (0, "4.4.1", "Deferred: Connection refused by mx.x.test.", ""),
        ("blocked", False, False, False),
    ),
    ((554, "5.7.1", "Connection refused", "CONN"), ("blocked", False, False, True)),
    # No reply at all at connect time (the delivery side's own words for a
    # socket error): the network, never a block of the IP.
    ((0, "", "Connection refused", "CONN"), ("networkerror", False, False, False)),
    (
        (0, "", "[Errno 111] Connect call failed ('192.0.2.1', 25)", "connect"),
        ("networkerror", False, False, False),
    ),
    # The server timed the client out (Postfix smtpd_timeout, Exim
    # smtp_receive_timeout): the network or the pace, no block, no slow-down.
    (
        (421, "4.4.2", "mx.x.test Error: timeout exceeded", "DATA"),
        ("networkerror", False, False, False),
    ),
    (
        (421, "", "mx.x.test SMTP incoming data timeout - closing connection.", "DATA"),
        ("networkerror", False, False, False),
    ),
    (
        (421, "4.4.2", "Connection dropped due to timeout", "DATA"),
        ("networkerror", False, False, False),
    ),
    # A directory-harvest guard refuses the session after earlier invalid
    # recipients: nothing about this recipient's address.
    (
        (550, "5.7.1", "Too many invalid recipients", "RCPT"),
        ("toomanyconn", False, False, False),
    ),
    # The recipient's own filter refuses this sender: the address receives
    # other mail (AOL's documented wording among them): never hard.
    (
        (550, "", "Recipient rejected: This user does not accept mails from your address", "RCPT"),
        ("filtered", False, False, False),
    ),
    (
        (550, "5.7.1", "Recipient is only accepting mail from specific email addresses", "RCPT"),
        ("filtered", False, False, False),
    ),
    # RFC 5322 conformance in the wordings servers use.
    (
        (550, "5.7.1", "Multiple From: headers in message are not allowed", "DATA"),
        ("notcompliantrfc", False, False, False),
    ),
    (
        (554, "5.6.0", "Message does not conform to RFC 5322", "DATA"),
        ("notcompliantrfc", False, False, False),
    ),
    # Exim's deferral when a sender callout cannot finish: about our sender.
    ((451, "", "Could not complete sender verify", "RCPT"), ("rejected", False, False, False)),
    # Gmail's permanent refusal for unsolicited mail from the IP "has been
    # blocked": rest the IP (as a 421 4.7.28 the same words only slow down).
    (
        (
            550,
            "5.7.1",
            "Our system has detected an unusual rate of unsolicited mail originating from "
            "your IP address. To protect our users from spam, mail sent from your IP "
            "address has been blocked.",
            "RCPT",
        ),
        ("blocked", False, True, True),
    ),
    (
        (
            421,
            "4.7.28",
            "Our system has detected an unusual rate of unsolicited mail originating from "
            "your IP address. To protect our users from spam, mail sent from your IP "
            "address has been temporarily rate limited.",
            "RCPT",
        ),
        ("speeding", False, True, False),
    ),
    # A cap on connections at once, at the greeting (Exchange's receive
    # connector, KumoMTA's max_connections: 421 4.3.2): fewer connections.
    (
        (
            421,
            "4.3.2",
            "The maximum number of concurrent server connections has exceeded a limit, "
            "closing transmission channel",
            "CONN",
        ),
        ("toomanyconn", False, True, False),
    ),
    (
        (421, "", "Too many open connections from your host", "CONN"),
        ("toomanyconn", False, True, False),
    ),
    (
        (421, "4.7.0", "Maximum number of connections per IP reached", "CONN"),
        ("toomanyconn", False, True, False),
    ),
    # A block list that lists something other than the sending IP (one
    # recipient's own list, our sender address or domain, a link in the
    # message): resting the IP would stop every recipient at the site.
    (
        (
            550,
            "5.7.1",
            "<bob@x.test>: Recipient address rejected: Sender is on user's blacklist",
            "RCPT",
        ),
        ("filtered", False, False, False),
    ),
    (
        (550, "5.7.1", "Blocked by recipient's personal block list", "RCPT"),
        ("filtered", False, False, False),
    ),
    (
        (554, "5.7.1", "Your sender domain sender.test is blacklisted", "MAIL"),
        ("rejected", False, False, False),
    ),
    (
        (550, "5.7.1", "Sender address is on our blocklist", "MAIL"),
        ("rejected", False, False, False),
    ),
    (
        (554, "5.7.1", "Message contains a blacklisted URL", "DATA"),
        ("spamdetected", False, False, False),
    ),
    (
        (550, "", "Message rejected: URL in message body is listed on a black list", "DATA"),
        ("spamdetected", False, False, False),
    ),
    # ... while a listed IP still rests it.
    ((550, "", "Your IP 192.0.2.1 is blacklisted", "CONN"), ("blocked", False, False, True)),
    (
        (554, "", "192.0.2.1 is listed on the Block List bl.example", "CONN"),
        ("blocked", False, False, True),
    ),
    # Wordings of documented refusals: an SPF policy (Zoho, Mail.ru), a
    # missing reverse lookup.
    (
        (550, "5.7.1", "Email rejected per SPF policy", "MAIL"),
        ("authfailure", False, False, False),
    ),
    (
        (550, "", "Sender IP reverse lookup rejected", "CONN"),
        ("requireptr", False, False, True),
    ),
    # A 521 whose status names a mailbox or a policy is not "host does not
    # accept mail" (RFC 7504's 521 5.3.2): the address is not dead.
    (
        (521, "5.2.1", "AOL will not accept delivery of this message.", "DATA"),
        ("filtered", False, False, False),
    ),
    (
        (521, "5.3.2", "mx.x.test does not accept mail", "CONN"),
        ("notaccept", True, False, False),
    ),
    # Exchange's expiry NDR quotes the socket error the last attempts met:
    # expired, not the site refusing the IP.
    (
        (550, "5.4.316", "Message expired, connection refused(Socket error code 10061)", ""),
        ("expired", False, False, False),
    ),
    # Outlook.com's RP-001..003: a sending limit per hour and day.
    (
        (
            421,
            "",
            "RP-001 (BAY004-MC1F33) Unfortunately, some messages from 192.0.2.1 weren't "
            "sent. Please try again. We have limits for how many messages can be sent per "
            "hour and per day.",
            "MAIL",
        ),
        ("speeding", False, True, False),
    ),
    # pypolicyd-spf's refusal points at the SPF explanation page.
    (
        (
            554,
            "5.7.1",
            "<bob@x.test>: Recipient address rejected: Please see "
            "http://www.open-spf.org/Why?s=mfrom;id=a@sender.test;ip=192.0.2.1;r=x.test",
            "RCPT",
        ),
        ("authfailure", False, False, False),
    ),
    # amavisd-new's virus refusal.
    (
        (554, "5.7.0", "Reject, id=12345-01 - INFECTED: Eicar-Signature", "DATA"),
        ("virusdetected", False, False, False),
    ),
    # One full mailbox's "try again later" is not the site asking to slow down.
    (
        (450, "4.2.2", "Mailbox full, try again later", "RCPT"),
        ("mailboxfull", False, False, False),
    ),
    ((550, "5.4.312", "DNS query failed", "RCPT"), ("networkerror", False, False, False)),
    # aiosmtpd's (and Python smtpd's) reply to a message over its size
    # limit: the message, not a full mailbox.
    ((552, "", "Error: Too much mail data", "DATA"), ("mesgtoobig", False, False, False)),
    # RFC 5321's 555: a MAIL/RCPT parameter we sent is not supported.
    (
        (555, "", "RCPT TO parameters not recognized or not implemented", "RCPT"),
        ("syntaxerror", False, False, False),
    ),
    # A message blocked by a content policy or by the recipient's own
    # rules: not the IP ("was blocked by" alone read as an IP block).
    (
        (550, "5.7.1", "Message was blocked by content policy", "DATA"),
        ("policyviolation", False, False, False),
    ),
    (
        (554, "5.7.1", "This message was blocked by the recipient's mail filter rules", "DATA"),
        ("filtered", False, False, False),
    ),
    (
        (550, "5.7.1", "The recipient has blocked your email address", "RCPT"),
        ("filtered", False, False, False),
    ),
    (
        (550, "", "Your IP was blocked by the administrator", "RCPT"),
        ("blocked", False, False, True),
    ),
    # Gmail's documented refusal of a message without a valid From, and a
    # missing Date (RFC 5322 3.6 requires both).
    (
        (
            550,
            "5.7.1",
            "Messages missing a valid address in From: header, or having no From: header, "
            "are not accepted.",
            "DATA",
        ),
        ("notcompliantrfc", False, False, False),
    ),
    ((550, "5.7.1", "Missing Date header", "DATA"), ("notcompliantrfc", False, False, False)),
    # A per-message recipient limit in Gmail's words (452 4.5.3): the rest go
    # in another transaction; no slow-down.
    (
        (
            452,
            "4.5.3",
            "Your message has too many recipients. For more information regarding "
            "Google's sending limits, visit https://support.google.com/mail/?p=TooManyRecipientsError",
            "RCPT",
        ),
        ("toomanyconn", False, False, False),
    ),
    # Yahoo: our MAIL FROM domain does not resolve (our DNS, not a pace).
    (
        (
            451,
            "",
            "Message temporarily deferred due to unresolvable RFC.5321 from domain; "
            "see https://postmaster.yahooinc.com/error-codes",
            "MAIL",
        ),
        ("rejected", False, False, False),
    ),
    # Decisions that held (kept so they stay held).
    (
        (
            554,
            "5.7.1",
            "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
            "RCPT",
        ),
        ("blocked", False, False, True),
    ),
    (
        (550, "5.7.606", "Access denied, banned sending IP [192.0.2.1].", "RCPT"),
        ("blocked", False, False, True),
    ),
    (
        (
            550,
            "5.1.1",
            "<bob@x.test>: Recipient address rejected: User unknown in local recipient table",
            "RCPT",
        ),
        ("userunknown", True, False, False),
    ),
    (
        (554, "5.7.1", "<bob@x.test>: Relay access denied", "RCPT"),
        ("norelaying", False, False, False),
    ),
    (
        (552, "5.3.4", "Message size exceeds fixed limit", "DATA"),
        ("mesgtoobig", False, False, False),
    ),
    # Barracuda's per-recipient policy verdict: blocked, but nothing says the
    # IP is listed (a sender, content or recipient rule of the organisation):
    # no IP rest; its reputation list names itself.
    (
        (
            550,
            "",
            "permanent failure for one or more recipients (bob@x.test:blocked)",
            "DATA",
        ),
        ("blocked", False, False, False),
    ),
    (
        (
            554,
            "5.7.1",
            "Service unavailable; Client host [192.0.2.1] blocked using b.barracudacentral.org",
            "RCPT",
        ),
        ("blocked", False, False, True),
    ),
    (
        (
            550,
            "",
            "permanent failure for one or more recipients (bob@x.test:blocked)"
            " Blocked - see http://www.barracudacentral.org/rbl?ip=192.0.2.1",
            "DATA",
        ),
        ("blocked", False, False, True),
    ),
    # AOL's legacy codes (postmaster.info.aol.com/errors): RTR/RLY/DNS block
    # the IP, HVU a domain in the content, CON:B1 says back off.
    (
        (554, "", "RTR:BB http://postmaster.info.aol.com/errors/554rtrbb.html", "CONN"),
        ("blocked", False, False, True),
    ),
    (
        (554, "", "RLY:B1 http://postmaster.info.aol.com/errors/554rlyb1.html", "RCPT"),
        ("blocked", False, False, True),
    ),
    (
        (554, "", "HVU:B1 http://postmaster.info.aol.com/errors/554hvub1.html", "DATA"),
        ("spamdetected", False, False, False),
    ),
    (
        (421, "", "CON:B1 http://postmaster.info.aol.com/errors/421conb1.html", "CONN"),
        ("toomanyconn", False, True, False),
    ),
    # NetEase (mail.163.com/help/help_spam_16.htm).
    (
        (
            421,
            "",
            "HL:ICC 192.0.2.1 connections exceeded http://mail.163.com/help",
            "CONN",
        ),
        ("toomanyconn", False, True, False),
    ),
    (
        (421, "", "HL:REP 192.0.2.1 http://mail.163.com/help/help_spam_16.htm", "CONN"),
        ("blocked", False, False, True),
    ),
    (
        (
            554,
            "",
            "DT:SPM 163 mx12,QMCowABHr2Y; http://mail.163.com/help/help_spam_16.htm?ip=192.0.2.1",
            "DATA",
        ),
        ("spamdetected", False, False, False),
    ),
    (
        (450, "", "MI:DMC 163 smtp3 too many mails in this connection", "MAIL"),
        ("toomanyconn", False, True, False),
    ),
    # Replies from the MTAs Sisimai's reason tables collect, worded unlike
    # the corpus: an address without an "e" in "unroutable", a domain that
    # does not exist refused at RCPT, a dynamic-IP policy, qmail's rcpthosts.
    ((550, "", "Unroutable address", "RCPT"), ("hostunknown", True, False, False)),
    (
        (
            550,
            "5.1.2",
            "<bob@nx.test>: Recipient address rejected: Domain not found",
            "RCPT",
        ),
        ("hostunknown", True, False, False),
    ),
    (
        (550, "", "We do not accept mail from dynamic IPs", "CONN"),
        ("blocked", False, False, True),
    ),
    (
        (
            553,
            "",
            "sorry, that domain or user isn't in my list of allowed rcpthosts",
            "RCPT",
        ),
        ("userunknown", True, False, False),
    ),
    (
        (550, "", "Mail server at 192.0.2.1 is blocked", "MAIL"),
        ("blocked", False, False, True),
    ),
    (
        (554, "", "Message was rejected for possible spam/virus content", "DATA"),
        ("spamdetected", False, False, False),
    ),
    # Spectrum/Charter AUP#I/O codes, i.ua's error pages, Cloudflare Email Routing.
    (
        (554, "5.7.1", "AUP#I-1000 https://www.spectrum.net/support/internet/", "CONN"),
        ("blocked", False, False, True),
    ),
    (
        (421, "4.7.0", "AUP#O1310 too many connections", "CONN"),
        ("toomanyconn", False, True, False),
    ),
    ((452, "4.7.0", "AUP#I-1550", "RCPT"), ("speeding", False, True, False)),
    (
        (550, "", "AUP#I-1120 no reverse DNS", "CONN"),
        ("requireptr", False, False, True),
    ),
    (
        (550, "", "User not found. http://mail.i.ua/err/2/", "RCPT"),
        ("userunknown", True, False, False),
    ),
    (
        (550, "", "Mailbox is full. http://mail.i.ua/err/4/", "RCPT"),
        ("mailboxfull", False, False, False),
    ),
    (
        (554, "", "192.0.2.1 found on one or more DNSBLs, see https://x.test", "CONN"),
        ("blocked", False, False, True),
    ),
    # GoDaddy's IB codes (help article 40685): a per-message recipient limit
    # is no slow-down; an IP blocked for invalid recipients is rested.
    (
        (
            452,
            "",
            "This message contains too many recipients. Reduce the number. IB605",
            "RCPT",
        ),
        ("toomanyconn", False, False, False),
    ),
    (
        (
            554,
            "",
            "This IP has been temporarily blocked for attempting to mail too many invalid"
            " recipients. IB112",
            "RCPT",
        ),
        ("blocked", False, False, True),
    ),
    (
        (550, "", "This IP has sent too many messages this hour. IB504", "RCPT"),
        ("speeding", False, True, False),
    ),
    (
        (
            550,
            "",
            "jane@x.test Blank From: addresses are not allowed. Provide a valid From. IB501",
            "DATA",
        ),
        ("notcompliantrfc", False, False, False),
    ),
    # Orange/La Poste codes: 401 and 517 are SPF and DMARC failures (not an IP
    # block), 630 a policy of the receiving domain, 999 a refused service.
    (
        (
            550,
            "5.5.0",
            "SPF: 192.0.2.1 is not allowed to send mail. LPN004_401",
            "RCPT",
        ),
        ("authfailure", False, False, False),
    ),
    (
        (554, "5.7.1", "Client host rejected LPN000_630", "RCPT"),
        ("policyviolation", False, False, False),
    ),
    (
        (
            421,
            "",
            "mwinf5c77 ME Service refuse. Veuillez essayer plus tard. OFR_999 [999]",
            "CONN",
        ),
        ("blocked", False, False, True),
    ),
    # Mimecast's documented replies.
    (
        (550, "", "SPF Sender Invalid - envelope rejected", "RCPT"),
        ("authfailure", False, False, False),
    ),
    (
        (553, "", "This route requires TLS version 1.2 or greater", "MAIL"),
        ("failedstarttls", False, False, False),
    ),
    (
        (451, "", "Account service is temporarily unavailable", "CONN"),
        ("toomanyconn", False, True, False),
    ),
    (
        (550, "", "Local CT IP Reputation - (Reject)", "RCPT"),
        ("badreputation", False, False, True),
    ),
    # Microsoft's NDR tables: 5.7.511 bans the IP; the DANE/TLS codes are
    # TLS failures; a replication failure is the server's own trouble.
    (
        (550, "5.7.511", "Access denied, banned sender", "MAIL"),
        ("blocked", False, False, True),
    ),
    (
        (450, "4.7.323", "tlsa-invalid: The domain failed DANE validation.", "RCPT"),
        ("failedstarttls", False, False, False),
    ),
    (
        (
            451,
            "4.4.23",
            "Message failed to be replicated: No healthy secondary server",
            "DATA",
        ),
        ("systemerror", False, False, False),
    ),
    (
        (550, "5.7.1", "Delivery not authorized", "RCPT"),
        ("rejected", False, False, False),
    ),
    # QQ Mail's help pages, Yahoo's and iCloud's documented replies.
    (
        (
            550,
            "",
            "Suspected spam ip, https://service.mail.qq.com/detail/122/66",
            "CONN",
        ),
        ("blocked", False, False, True),
    ),
    (
        (550, "", "Domain frequency limited", "MAIL"),
        ("toomanyconn", False, True, False),
    ),
    (
        (
            550,
            "",
            "Mailbox not found. https://service.mail.qq.com/detail/122/169",
            "DATA",
        ),
        ("userunknown", True, False, False),
    ),
    (
        (554, "", "delivery error: dd bob@yahoo.example is no longer valid.", "DATA"),
        ("suspend", False, False, False),
    ),
    (
        (
            421,
            "",
            "Max message per connection reached, closing transmission channel",
            "MAIL",
        ),
        ("toomanyconn", False, False, False),
    ),
    (
        (
            554,
            "5.7.1",
            "[HME1] This message was blocked for failing both SPF and DKIM",
            "DATA",
        ),
        ("authfailure", False, False, False),
    ),
    # Gmail's documented table: words that read as another reason elsewhere
    # ("bulk email senders" is no spam verdict, "exceeded its quota" no full
    # mailbox), a recipient domain's own allowlist rests no IP.
    (
        (
            421,
            "4.7.29",
            "Gmail requires all bulk email senders to use TLS/SSL for SMTP",
            "DATA",
        ),
        ("failedstarttls", False, False, False),
    ),
    (
        (
            421,
            "4.7.28",
            "Gmail has detected this message exceeded its quota for sending messages"
            " with the same Message-ID:",
            "DATA",
        ),
        ("policyviolation", False, False, False),
    ),
    (
        (
            421,
            "4.7.0",
            "IP not in whitelist for RCPT domain, closing connection.",
            "RCPT",
        ),
        ("blocked", False, False, False),
    ),
    (
        (
            550,
            "5.7.30",
            "This mail has been blocked because DKIM does not pass.",
            "DATA",
        ),
        ("authfailure", False, False, False),
    ),
    (
        (
            550,
            "5.7.1",
            "Messages missing a valid Message-ID: header are not accepted.",
            "DATA",
        ),
        ("notcompliantrfc", False, False, False),
    ),
    (
        (
            552,
            "5.3.4",
            "Your message exceeded Google's message header size limits.",
            "DATA",
        ),
        ("exceedlimit", False, False, False),
    ),
    # Facebook's response codes, Symantec Email Security.cloud (MessageLabs), Cox.
    (
        (550, "", "POL-P2 http://postmaster.facebook.com/response_codes#pol", "RCPT"),
        ("blocked", False, False, True),
    ),
    (
        (550, "", "RCP-P1 http://postmaster.facebook.com/response_codes#rcp", "RCPT"),
        ("userunknown", True, False, False),
    ),
    (
        (553, "", "Sorry, your email address has been blocked", "MAIL"),
        ("rejected", False, False, False),
    ),
    (
        (451, "", "TLS/SSLv3 Connection required. (#4.7.1)", "RCPT"),
        ("failedstarttls", False, False, False),
    ),
    ((550, "5.2.0", "Message Filtered", "DATA"), ("filtered", False, False, False)),
    (
        (421, "", "too many sessions from 192.0.2.1", "CONN"),
        ("toomanyconn", False, True, False),
    ),
    # Zoho Mail: a 5.1.1 "restricted by policy" is no unknown user.
    (
        (552, "5.1.1", "<bob@zoho.example> Mailbox delivery restricted by policy error", "RCPT"),
        ("policyviolation", False, False, False),
    ),
    ((452, "4.3.1", "Temporary System Error", "RCPT"), ("systemerror", False, False, False)),
    # Exim's own texts for failures it decides itself.
    (
        (550, "", "all relevant MX records point to non-existent hosts", ""),
        ("hostunknown", True, False, False),
    ),
    (
        (550, "", "an MX or SRV record indicated no SMTP service", ""),
        ("notaccept", True, False, False),
    ),
    # An address that "no longer accepts mail" is suspended (Sisimai's
    # suspend: it may come back), not unknown.
    (
        (550, "5.1.1", "This address no longer accepts mail.", "RCPT"),
        ("suspend", False, False, False),
    ),
    # A relay's report that it could not connect, under RFC 3463 X.4.x
    # ("network and routing"): Exchange Online's 4.4.316 "Connection
    # refused" and 4.4.0 quoting a "Connection dropped due to SocketError".
    # Nothing the site said about our IP: no rest for it, no slow-down.
    (
        (451, "4.4.316", "Connection refused", "RCPT"),
        ("networkerror", False, False, False),
    ),
    (
        (
            451,
            "4.4.0",
            'Primary target IP address responded with: "421 4.4.2 Connection dropped due to'
            ' SocketError."',
            "RCPT",
        ),
        ("networkerror", False, False, False),
    ),
    (
        (550, "5.4.316", "Message expired, connection refused", ""),
        ("expired", False, False, False),
    ),
    # Gmail's per-transaction recipient limit (support.google.com/a/answer/
    # 3726730): the rest go in another transaction, nothing about pace.
    (
        (
            452,
            "4.5.3",
            "Domain policy size per transaction exceeded, please try this recipient in a"
            " separate transaction.",
            "RCPT",
        ),
        ("toomanyconn", False, False, False),
    ),
    # RFC 3463 X.5.3 "Too many recipients" in words no rule knows.
    ((452, "4.5.3", "Try the rest later", "RCPT"), ("toomanyconn", False, False, False)),
    # sendmail's relay check when our IP's reverse lookup fails (proto.m4):
    # "relaying" in words, the PTR record in fact.
    (
        (
            550,
            "5.7.1",
            "<bob@example.org>... Relaying denied. IP name lookup failed [192.0.2.1]",
            "RCPT",
        ),
        ("requireptr", False, False, True),
    ),
    # qmail-smtpd's badmailfrom (and spamcontrol's wording): our sender.
    (
        (553, "", "sorry, your envelope sender has been denied (#5.7.1)", "MAIL"),
        ("rejected", False, False, False),
    ),
    (
        (553, "", "sorry, your envelope sender has been denied (#5.7.1)", "RCPT"),
        ("rejected", False, False, False),
    ),
    # NTT docomo (docomo.ne.jp) answers after the end of DATA: "550 Unknown
    # user ADDR" when the recipient's reception filter refuses our sender
    # (an address that does not exist is refused at RCPT), "552 Too much
    # mail data ADDR" when the mailbox is full (documented by senders to
    # docomo, e.g. note.com/sendmagic "SMTP応答コードについて【ドコモ編】").
    (
        (550, "", "Unknown user taro@docomo.ne.jp", "DATA"),
        ("rejected", False, False, False),
    ),
    (
        (552, "", "Too much mail data taro@docomo.ne.jp", "DATA"),
        ("mailboxfull", False, False, False),
    ),
    # The same words from another host keep their usual reading.
    ((552, "", "Error: Too much mail data", "DATA"), ("mesgtoobig", False, False, False)),
    ((550, "", "Unknown user taro@example.org", "RCPT"), ("userunknown", True, False, False)),
    # Postfix's DNS lookup that failed for now (the resolver's TRY_AGAIN:
    # "Host not found, try again"), reported in a delay notice: the network,
    # not a domain that takes no mail.
    (
        (
            0,
            "4.4.3",
            "Host or domain name not found. Name service error for name=example.org type=MX:"
            " Host not found, try again",
            "",
        ),
        ("networkerror", False, False, False),
    ),
    # ... while a name that does not exist is the domain's.
    (
        (
            0,
            "5.4.4",
            "Host or domain name not found. Name service error for name=example.org type=A:"
            " Host not found",
            "",
        ),
        ("hostunknown", True, False, False),
    ),
    # Exchange's own NDR codes (learn.microsoft.com, "Delivery status
    # notifications in Exchange Server"): a group's delivery restrictions
    # refuse our sender; a submission quota is our sender's pace, not the
    # recipient's mailbox (its 5.2.2 says "mailbox" only by number).
    (
        (550, "5.7.1", "RESOLVER.RST.NotAuthorized; not authorized ##", ""),
        ("rejected", False, False, False),
    ),
    (
        (
            550,
            "5.7.1",
            "RESOLVER.RST.DLNeedsSenderRestrictions; Delivery restriction check failed as"
            " sender not in allowed list ##",
            "",
        ),
        ("rejected", False, False, False),
    ),
    (
        (
            550,
            "5.2.2",
            "STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process"
            " message due to a permanent exception with message Cannot submit message.",
            "",
        ),
        ("speeding", False, True, False),
    ),
    # A gateway's recipient verification (Barracuda, Mimecast, an Exim
    # callout) asked the server behind it: the address is not there.
    (
        (550, "", "Recipient verification failed (bob@example.org)", "RCPT"),
        ("userunknown", True, False, False),
    ),
    (
        (553, "5.7.1", "Message rejected: recipient address verification failed", "RCPT"),
        ("userunknown", True, False, False),
    ),
    # ... which our sender's verification is not.
    ((550, "", "Sender verification failed", "RCPT"), ("rejected", False, False, False)),
    # sendmail finding itself in the destination's MX list: a
    # misconfigured mail system, not a dead address.
    (
        (0, "5.0.0", "MX list for example.org. points back to mx.example.net", ""),
        ("systemerror", False, False, False),
    ),
    (
        (554, "5.3.5", "config error: mail loops back to me (MX problem?)", ""),
        ("systemerror", False, False, False),
    ),
    # Mail.ru's limit on mail to one mailbox (help.mail.ru, postmaster
    # errors): a pace to slow down to, written as one word.
    (
        (451, "", "Ratelimit exceeded for mailbox bob@mail.example. Try again later.", "RCPT"),
        ("speeding", False, True, False),
    ),
    # A link in the body to a listed domain (SURBL/URIBL style): the
    # content, not the sending IP.
    (
        (554, "5.7.1", "Message blocked: contains a link to a blacklisted domain", "DATA"),
        ("spamdetected", False, False, False),
    ),
    # Outlook.com / Exchange Online: our envelope sender's domain found in
    # Spamhaus (its domain list): the domain, not the IP, is the cause.
    (
        (
            550,
            "5.7.1",
            "Service unavailable, MailFrom domain is listed in Spamhaus. To request removal from"
            " this list see https://www.spamhaus.org/query/lookup/ (S8002)",
            "MAIL",
        ),
        ("spamdetected", False, False, False),
    ),
    # Exchange Online NDRs (learn.microsoft.com, "Email non-delivery reports
    # and SMTP errors in Exchange Online"): 5.7.508, the recipient domain's IP
    # allow list lacks our IP; 5.7.133-136, a group or mailbox taking mail
    # only from authenticated (internal) senders: about our sender.
    (
        (550, "5.7.508", "Access denied, [192.0.2.1] is not in the allowed list", "RCPT"),
        ("blocked", False, False, True),
    ),
    (
        (
            550,
            "5.7.133",
            "RESOLVER.RST.SenderNotAuthenticatedForGroup; authentication required; Delivery"
            " restriction check failed because the sender was not authenticated when sending"
            " to this group",
            "RCPT",
        ),
        ("rejected", False, False, False),
    ),
]


@pytest.mark.parametrize(("reply", "want"), CASES, ids=[f"{c[0][0]}-{c[0][2][:40]}" for c in CASES])
def test_documented_reply_decision(
    reply: tuple[int, str, str, str], want: tuple[str, bool, bool, bool]
) -> None:
    code, enhanced, text, stage = reply
    c = classify_reply(code, enhanced, text, command=stage)
    assert (c.reason, c.hard, c.rate_limited, c.ip_blocked) == want, c.rule


# The same reply reported later in a DSN (Postfix's layout: the reply in the
# human part with the command it answered, and in Diagnostic-Code): the
# intake must decide as the delivery side did when it got the reply itself.
_POSTFIX_DSN = """\
From: MAILER-DAEMON@mx.sender.example (Mail Delivery System)
To: news@sender.example
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b"

--b
Content-Type: text/plain

This is the mail system at host mx.sender.example.

<vic@rcpt.example>: {said} {reply}{in_reply}

--b
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.sender.example

Final-Recipient: rfc822; vic@rcpt.example
Action: {action}
Status: {status}
Remote-MTA: dns; mx.rcpt.example
Diagnostic-Code: smtp; {reply}

--b--
"""
_IN_REPLY = {"RCPT": "RCPT TO", "MAIL": "MAIL FROM", "DATA": "end of DATA", "EHLO": "EHLO"}
# (Not the cases with no reply at all, code 0: our own connection errors.)
_REPLIES = [c for c in CASES if c[0][0]]


@pytest.mark.parametrize(
    ("reply", "want"), _REPLIES, ids=[f"{c[0][0]}-{c[0][2][:40]}" for c in _REPLIES]
)
def test_a_dsn_of_the_reply_decides_as_the_delivery_side(
    reply: tuple[int, str, str, str], want: tuple[str, bool, bool, bool]
) -> None:
    code, enhanced, text, stage = reply
    sync = classify_reply(code, enhanced, text, command=stage)
    said = (
        "host mx.rcpt.example[192.0.2.9] refused to talk to me:"
        if stage == "CONN"
        else "host mx.rcpt.example[192.0.2.9] said:"
    )
    raw = _POSTFIX_DSN.format(
        said=said,
        reply=f"{code} {enhanced + ' ' if enhanced else ''}{text}",
        in_reply=f" (in reply to {_IN_REPLY[stage]} command)" if stage in _IN_REPLY else "",
        action="failed" if code >= 500 else "delayed",
        status=enhanced or ("5.0.0" if code >= 500 else "4.0.0"),
    )
    (r,) = parse_bounce(raw.encode())
    assert (r.reason, r.hard) == (sync.reason, sync.hard), (r, sync)
